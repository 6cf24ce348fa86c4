"""Simulated devices: real MQTT 5 clients that follow the agent's directive contract.

`SimulatedFleet` runs N lightweight agents against a real broker, for demos, tests and scale
benchmarks. Each device has its own connection (user name = device id), a retained status and
a last will. Directives and bundles are verified for real (`accept_directive`, `verify_bundle`
with the directive's sha256 pin) and bundles fetched over MQTT chunks; a simulated health check
decides commit or rollback, following the directive-outcome contract in `edgekit.topics`.
Devices send `Telemetry` from a latency/error model and count what they send, so a test can
compare.

Scale: clients do not get a thread each. A few `NetworkLoop` threads drive every socket and a
small worker pool runs the blocking steps of directives (fetch, verify): a thousand devices fit
on two cores.

Faults go to exactly `round(fraction * N)` devices, those with the lowest stable hash of (seed,
device id, fault), so a test knows which devices fail.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import msgspec

from edgekit import __version__
from edgekit.bundle import verify_bundle
from edgekit.contract import Accepted, Duplicate, Refused, accept_directive, bundle_mismatch
from edgekit.errors import BundleError, EdgekitError, TransportError, first_line
from edgekit.messages import BundleId, Event, Status, Telemetry
from edgekit.mqtt import BrokerSettings, Message, MqttClient, NetworkLoop
from edgekit.topics import Topics, check_identifier, client_id
from edgekit.transfer import MqttBundleFetcher
from edgekit.trust import DirectiveFloor, TrustStore, TrustUpdateError, verify_trust_message

__all__ = [
    "DEFAULT_PROFILE",
    "DeviceSpec",
    "Faults",
    "SentCounts",
    "SimulatedDevice",
    "SimulatedFleet",
    "SimulationError",
    "fault_devices",
    "make_device_specs",
]

log = logging.getLogger(__name__)

DEFAULT_PROFILE = "x86-64"
AGENT_VERSION = f"edgekit-sim/{__version__}"

# Base p50 inference latency (ms) per shipped profile; unknown profiles get the default.
_BASE_LATENCY_MS = {
    "x86-64": 2.5,
    "jetson-orin": 3.0,
    "raspberrypi": 12.0,
    "raspberrypi-tflite": 10.0,
    "raspberrypi-zero2": 45.0,
    "coral-edgetpu": 4.0,
    "android-arm64": 8.0,
    "cortex-m": 80.0,
}
_DEFAULT_LATENCY_MS = 10.0
_TICK_S = 0.1  # how often the network loops run the devices' timers (telemetry)
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 15.0  # reconnect backoff bounds
_MAX_TELEMETRY_BURST = 50  # telemetry messages one device sends per tick, at most
_TELEMETRY_SEQ_BLOCK = 100  # telemetry seqs reserved in the kept state per write


class SimulationError(EdgekitError):
    """The simulated fleet cannot start as asked (bad broker URL, ids, options)."""


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: id (also its MQTT user name), profile, group, tags, password."""

    device_id: str
    profile: str = DEFAULT_PROFILE
    group: str = "sim"
    tags: Mapping[str, str] = field(default_factory=dict)
    password: str | None = None

    def __post_init__(self) -> None:
        check_identifier(self.device_id, what="device")


def make_device_specs(
    count: int,
    *,
    profiles: Sequence[str] = (DEFAULT_PROFILE,),
    prefix: str = "sim",
    group: str = "sim",
) -> list[DeviceSpec]:
    """`count` devices `<prefix>-0000`, ... cycling through `profiles`, tagged by site."""
    if count < 1:
        raise SimulationError(f"a simulated fleet needs at least one device; got {count}")
    if not profiles:
        raise SimulationError("give at least one profile for the simulated devices")
    width = max(4, len(str(count - 1)))
    return [
        DeviceSpec(
            device_id=f"{prefix}-{index:0{width}d}",
            profile=profiles[index % len(profiles)],
            group=group,
            tags={"site": f"site-{'ab'[index % 2]}"},
        )
        for index in range(count)
    ]


def _unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) from `parts` (same inputs, same number, any machine)."""
    digest = hashlib.sha256("\x00".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fault_devices(device_ids: Iterable[str], fraction: float, *, seed: int, fault: str) -> set[str]:
    """The `round(fraction * N)` devices with the lowest stable hash for this fault and seed."""
    ids = sorted(set(device_ids))
    count = round(max(0.0, min(1.0, fraction)) * len(ids))
    return set(sorted(ids, key=lambda device: _unit_hash(seed, fault, device))[:count])


@dataclass(frozen=True)
class Faults:
    """Injectable faults, as fractions of the fleet (0..1).

    `fail_health`: the health check of a new bundle fails (the device rolls back).
    `slow`: latency multiplied by `slow_factor` while running a new bundle.
    `drift`: drift PSI `drift_psi` (instead of ~0.03) while running a new bundle.
    `offline`: the device connects once (retained status), then drops off with its last will
    (`offline_mode="drop"`) or never connects at all (`"never"`).
    A "new bundle" is any bundle other than the fleet's initial one, or only the `versions`
    listed. `*_devices` name devices that get the fault in addition to the chosen fraction.
    """

    fail_health: float = 0.0
    slow: float = 0.0
    offline: float = 0.0
    drift: float = 0.0
    seed: int = 0
    slow_factor: float = 3.0
    drift_psi: float = 0.45
    offline_mode: Literal["drop", "never"] = "drop"
    versions: frozenset[str] = frozenset()
    fail_health_devices: frozenset[str] = frozenset()
    slow_devices: frozenset[str] = frozenset()
    offline_devices: frozenset[str] = frozenset()
    drift_devices: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("fail_health", "slow", "offline", "drift"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimulationError(f"fault {name} must be a fraction 0..1; got {value}")
        if self.slow_factor <= 0:
            raise SimulationError(f"slow_factor must be > 0; got {self.slow_factor}")

    def assign(self, device_ids: Sequence[str]) -> dict[str, set[str]]:
        """fault name -> devices that have it (deterministic)."""
        return {
            name: fault_devices(device_ids, getattr(self, name), seed=self.seed, fault=name)
            | set(getattr(self, f"{name}_devices"))
            for name in ("fail_health", "slow", "offline", "drift")
        }


@dataclass
class SentCounts:
    """What a device (or the fleet) sent, counted when handed to the MQTT client."""

    telemetry: int = 0
    requests: int = 0
    errors: int = 0
    status: int = 0
    events: Counter[str] = field(default_factory=Counter)

    def add(self, other: SentCounts) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def copy(self) -> SentCounts:
        return replace(self, events=Counter(self.events))

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "events": dict(sorted(self.events.items()))}


class _Job(msgspec.Struct, frozen=True):
    """The directive a device is applying."""

    sequence: int
    bundle: BundleId
    rollout_id: str


class _KeptState(msgspec.Struct):
    """A device's `devices/<id>/state.json`, kept across runs with `keep_state`."""

    last_sequence: int
    min_security_epoch: int
    active: BundleId | None = None
    previous: BundleId | None = None
    state: str | None = None
    rollout_id: str | None = None
    accepted_digest: str | None = None
    telemetry_seq: int = 0
    in_progress: _Job | None = None


# ---------------------------------------------------------------------------------------------
# One device.


class SimulatedDevice:
    """One simulated agent. Created and driven by `SimulatedFleet`; read-only for callers."""

    def __init__(self, spec: DeviceSpec, *, fleet: SimulatedFleet, loop: NetworkLoop) -> None:
        self.spec = spec
        self.device_id = spec.device_id
        self.faults = frozenset(
            f for f, ids in fleet.fault_assignment.items() if self.device_id in ids
        )
        self._fleet = fleet
        self._loop = loop
        self._topics = fleet.topics
        self._lock = threading.RLock()
        self.state = "committed" if fleet.initial_bundle else "idle"
        self.active = fleet.initial_bundle
        self.previous: BundleId | None = None
        self.rollout_id: str | None = None
        self.floor = DirectiveFloor()
        self.accepted_digest: str | None = None
        self.sent = SentCounts()
        self.history: list[tuple[int, str, str]] = []  # (sequence, sha256, outcome)
        self._want_online = "offline" not in self.faults or fleet.faults.offline_mode == "drop"
        self._next_telemetry = time.monotonic() + fleet.telemetry_interval_s * _unit_hash(
            spec.device_id
        )
        self._telemetry_seq = 0
        # With a kept state, seqs are reserved on disk a block at a time: a restarted (even
        # killed) simulator continues above every seq it sent, as the agent does.
        self._telemetry_reserved = 0
        self._random = random.Random(f"{fleet.faults.seed}:{spec.device_id}")
        self._pending: bytes | None = None  # the newest directive; older ones are superseded
        self._busy = False
        # The directive being applied, persisted: a simulator killed mid-update reports it
        # rolled back when it comes back.
        self._in_progress: _Job | None = None
        self._interrupted: _Job | None = None
        self._state_path = fleet.workdir / "devices" / self.device_id / "state.json"
        if fleet.keep_state:
            self._load_state()
        self.client = self._make_client()
        loop.add_tick(self.tick)

    # -- persistence (only with a work directory the caller keeps)

    def _load_state(self) -> None:
        try:
            kept = msgspec.json.decode(self._state_path.read_bytes(), type=_KeptState)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError):
            log.warning("ignoring unreadable simulator state %s", self._state_path)
            return
        self.floor = DirectiveFloor(kept.last_sequence, kept.min_security_epoch)
        self.active = kept.active
        self.previous = kept.previous
        self.state = kept.state or self.state
        self.rollout_id = kept.rollout_id
        self.accepted_digest = kept.accepted_digest
        self._telemetry_seq = self._telemetry_reserved = kept.telemetry_seq
        if kept.in_progress is not None:
            self._interrupted = kept.in_progress
            self.state = "rolled_back"

    def _save_state(self) -> None:
        if not self._fleet.keep_state:
            return
        path = self._state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        with self._lock:
            kept = _KeptState(
                last_sequence=self.floor.last_sequence,
                min_security_epoch=self.floor.min_security_epoch,
                active=self.active,
                previous=self.previous,
                state=self.state,
                rollout_id=self.rollout_id,
                accepted_digest=self.accepted_digest,
                telemetry_seq=max(self._telemetry_reserved, self._telemetry_seq),
                in_progress=self._in_progress,
            )
            temp.write_bytes(msgspec.json.encode(kept))
            os.replace(temp, path)

    # -- MQTT

    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def connects(self) -> int:
        return self.client.connects

    def _make_client(self) -> MqttClient:
        password = self.spec.password
        if password is None and self._fleet.passwords is not None:
            password = self._fleet.passwords.get(self.device_id)
        settings = self._fleet.broker
        if password is not None:
            settings = settings.replace(username=self.device_id, password=password)
        client = MqttClient(
            settings,
            client_id=client_id("sim", self.device_id),
            will=(self._topics.status(self.device_id), self._status(online=False).to_json()),
            loop=self._loop,
            retry_refused=False,  # wrong credentials do not get better by retrying
            on_connect=self._on_connect,
        )
        client.subscribe(self._topics.desired(self.device_id), self._on_desired)
        client.subscribe(self._topics.trust(), self._on_trust)
        return client

    def _connect(self) -> None:
        if self._want_online and not self._fleet.stopping:
            self.client.start()

    def _on_connect(self) -> None:
        self.publish_status()
        if self.connects == 1:
            self._event("agent_started", details={"simulated": True})
            if self._interrupted is not None:
                job, self._interrupted = self._interrupted, None
                self._event(
                    "rolled_back",
                    reason="the agent restarted during the update and undid it",
                    bundle=job.bundle,
                    sequence=job.sequence,
                    rollout_id=job.rollout_id,
                )
                self._finish(job, "rolled_back")
        if "offline" in self.faults:
            # Gone for good, the way a device loses power: the broker publishes the will.
            self._want_online = False
            self.client.drop()

    def _on_trust(self, message: Message) -> None:
        if message.payload:  # an empty retained message clears the topic
            self._fleet._apply_trust(bytes(message.payload))

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return
        with self._lock:
            self._pending = message.payload
            if self._busy:
                return
            self._busy = True
        try:
            self._fleet._workers.submit(self._drain_directives)
        except RuntimeError:  # stopping: the pool is shut down
            self._busy = False

    def tick(self, now: float) -> None:
        """On the loop thread: telemetry (the client reconnects and keeps alive itself)."""
        if self._fleet.stopping or not self.connected:
            return
        interval = self._fleet.telemetry_interval_s
        if interval > 0 and now >= self._next_telemetry:
            # Short intervals (load tests) send several per tick, up to a bound; a loop that
            # stalled longer does not catch up.
            due = min(_MAX_TELEMETRY_BURST, max(1, round(_TICK_S / interval)))
            self._next_telemetry += due * interval
            if self._next_telemetry < now:
                self._next_telemetry = now + due * interval
            for _ in range(due):
                self._send_telemetry(interval)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        try:
            self.client.publish(topic, payload, qos=qos, retain=retain)
        except TransportError as error:
            log.warning("device %s: %s", self.device_id, error)

    # -- messages

    def _status(self, *, online: bool) -> Status:
        return Status(
            fleet=self._fleet.fleet,
            device=self.device_id,
            online=online,
            state=self.state,
            profile=self.spec.profile,
            group=self.spec.group,
            tags=dict(self.spec.tags),
            active=self.active,
            previous=self.previous,
            rollout_id=self.rollout_id,
            last_sequence=self.floor.last_sequence,
            agent_version=AGENT_VERSION,
            ts=time.time(),
        )

    def publish_status(self, *, online: bool = True) -> None:
        """Publish the retained status (and re-set the will with the current state)."""
        with self._lock:
            payload = self._status(online=online).to_json()
            will = self._status(online=False).to_json()
            self.sent.status += 1
        # As the agent does: the will carries the current status (active, previous, sequence),
        # so a device that drops off keeps its state in the registry.
        self.client.set_will(self._topics.status(self.device_id), will)
        self._publish(self._topics.status(self.device_id), payload, retain=True)

    def _event(self, kind: str, **fields: Any) -> None:
        """Publish an `Event` of `kind` with `fields` (state, ok, reason, bundle, ...)."""
        event = Event(
            fleet=self._fleet.fleet, device=self.device_id, kind=kind, ts=time.time(), **fields
        )
        with self._lock:
            self.sent.events[kind] += 1
        self._publish(self._topics.events(self.device_id), event.to_json())

    def _faulted(self, fault: str, bundle: BundleId | None) -> bool:
        """Whether `fault` applies to this device while it runs `bundle`."""
        if fault not in self.faults or bundle is None:
            return False
        versions = self._fleet.faults.versions
        if versions:
            return bundle.version in versions
        initial = self._fleet.initial_bundle
        return initial is None or bundle.sha256 != initial.sha256

    def telemetry_sample(self, interval_s: float) -> Telemetry:
        """One interval of the latency/error model (also used by the benchmark)."""
        with self._lock:
            active, state, rollout_id = self.active, self.state, self.rollout_id
            self._telemetry_seq += 1
            seq = self._telemetry_seq
            reserve = self._fleet.keep_state and seq > self._telemetry_reserved
            if reserve:
                self._telemetry_reserved = seq + _TELEMETRY_SEQ_BLOCK - 1
        if reserve:
            self._save_state()
        rate = self._fleet.requests_per_s
        requests = max(0, round(rate * interval_s * self._random.uniform(0.7, 1.3)))
        errors = sum(1 for _ in range(requests) if self._random.random() < self._fleet.error_rate)
        base_ms = _BASE_LATENCY_MS.get(self.spec.profile, _DEFAULT_LATENCY_MS)
        p50 = base_ms * self._random.uniform(0.9, 1.1)
        if self._faulted("slow", active):
            p50 *= self._fleet.faults.slow_factor
        drift = (
            self._fleet.faults.drift_psi
            if self._faulted("drift", active)
            else 0.03 + 0.02 * self._random.random()
        )
        return Telemetry(
            fleet=self._fleet.fleet,
            device=self.device_id,
            seq=seq,
            interval_s=interval_s,
            requests=requests,
            errors=errors,
            latency_ms={
                "p50": round(p50, 3),
                "p95": round(p50 * 1.6, 3),
                "p99": round(p50 * 2.3, 3),
            },
            cpu_percent=round(15 + 30 * self._random.random(), 1),
            rss_bytes=60_000_000 + self._random.randrange(10_000_000),
            temperature_c=round(45 + 10 * self._random.random(), 1),
            drift_psi=round(drift, 4),
            bundle=active,
            rollout_id=rollout_id,
            state=state,
            dropped=0,
            ts=time.time(),
        )

    def _send_telemetry(self, interval_s: float) -> None:
        telemetry = self.telemetry_sample(interval_s)
        with self._lock:
            self.sent.telemetry += 1
            self.sent.requests += telemetry.requests
            self.sent.errors += telemetry.errors
        self._publish(self._topics.telemetry(self.device_id), telemetry.to_json())

    # -- directives (worker threads; one directive at a time per device)

    def _drain_directives(self) -> None:
        while True:
            with self._lock:
                payload, self._pending = self._pending, None
                if payload is None or self._fleet.stopping:
                    self._busy = False
                    return
            try:
                self._handle_directive(payload)
            except Exception:
                log.exception("device %s: directive handling failed", self.device_id)

    def _transition(
        self, state: str, *, bundle: BundleId | None, sequence: int, rollout_id: str
    ) -> None:
        with self._lock:
            self.state = state
        self._event("state", state=state, bundle=bundle, sequence=sequence, rollout_id=rollout_id)
        self.publish_status()
        delay = self._fleet.step_delay_s
        if delay > 0:
            time.sleep(delay)

    def _handle_directive(self, payload: bytes) -> None:
        verdict = accept_directive(
            payload,
            truststore=self._fleet.trust_store,
            fleet=self._fleet.fleet,
            device=self.device_id,
            floor=self.floor,
            accepted_digest=self.accepted_digest,
            now=datetime.now(timezone.utc),
        )
        if isinstance(verdict, Duplicate):
            return  # the retained directive we already acted on, redelivered on reconnect
        if isinstance(verdict, Refused):
            self._event(
                "directive_refused",
                reason=verdict.reason,
                sequence=verdict.sequence,
                details={"rule": verdict.rule},
            )
            return
        self._apply(verdict)

    def _apply(self, accepted: Accepted) -> None:
        directive, ref = accepted.directive, accepted.directive.bundle
        sequence, rollout_id = directive.sequence, directive.rollout_id
        target = BundleId(ref.name, ref.version, ref.sha256)
        job = _Job(sequence, target, rollout_id)
        with self._lock:
            self.floor = accepted.floor
            self.rollout_id = rollout_id
            self.accepted_digest = accepted.digest
            self._in_progress = job
        self._save_state()
        event = partial(self._event, bundle=target, sequence=sequence, rollout_id=rollout_id)
        step = partial(self._transition, bundle=target, sequence=sequence, rollout_id=rollout_id)
        event("directive_accepted")
        if self.active is not None and self.active.sha256 == target.sha256:
            # Already running it (e.g. a revert to what a failed device rolled back to).
            step("committed")
            event("committed")
            self._finish(job, "committed")
            return
        step("downloading")
        try:
            path = self._fleet._fetch(self, accepted)
        except (TransportError, OSError) as error:
            self._fail("bundle_refused", job, f"download failed: {first_line(error)}")
            return
        try:
            step("verifying")
            with path.open("rb") as handle:
                bundle = verify_bundle(
                    handle,
                    trust=self._fleet.trust_store,
                    min_security_epoch=self.floor.min_security_epoch,
                    expected_sha256=target.sha256,
                )
            manifest = bundle.manifest
            mismatch = bundle_mismatch(
                name=manifest.name,
                version=manifest.version,
                profile=manifest.profile,
                size_bytes=bundle.size_bytes,
                ref=ref,
                device_profile=self.spec.profile,
            )
            if mismatch is not None:
                raise BundleError(mismatch)
        except BundleError as error:
            self._fail("bundle_refused", job, first_line(error))
            return
        finally:
            path.unlink(missing_ok=True)
        step("installing")
        step("checking")
        healthy = not self._faulted("fail_health", target)
        details = {"golden_samples": 16, "max_abs_error": 0.002 if healthy else 0.9}
        event("health_check", ok=healthy, details=details)
        if not healthy:
            self._fail("rolled_back", job, "health check failed: golden outputs differ")
            return
        step("activating")
        with self._lock:
            self.previous, self.active = self.active, target
        step("probation")
        if self._fleet.probation_s > 0:
            time.sleep(self._fleet.probation_s)
        step("committed")
        event("committed")
        self._finish(job, "committed")

    def _fail(self, kind: Literal["bundle_refused", "rolled_back"], job: _Job, reason: str) -> None:
        """Report a failed directive: the event, then a retained `rolled_back` status (a
        controller that missed the event still sees the contract's failure)."""
        self._event(
            kind, reason=reason, bundle=job.bundle, sequence=job.sequence, rollout_id=job.rollout_id
        )
        self._transition(
            "rolled_back", bundle=self.active, sequence=job.sequence, rollout_id=job.rollout_id
        )
        self._finish(job, kind)

    def _finish(self, job: _Job, outcome: str) -> None:
        with self._lock:
            self.history.append((job.sequence, job.bundle.sha256, outcome))
            self._in_progress = None
        self._save_state()

    def stop(self) -> None:
        """On the loop thread: say goodbye with an offline status, then disconnect."""
        self._want_online = False
        with self._lock:
            self._telemetry_reserved = self._telemetry_seq  # the next run goes on from here
        self._save_state()
        if self.connected:
            self.publish_status(online=False)
        self.client.stop()


# ---------------------------------------------------------------------------------------------
# The fleet.


class SimulatedFleet:
    """N simulated agents on one broker. Use as a context manager, or `start()`/`stop()`.

    `devices` is a count (ids `sim-0000`...; profiles cycle through `profiles`) or explicit
    `DeviceSpec`s. `passwords` maps device id to MQTT password (user name = device id).
    `workdir` keeps download parts and (with `keep_state`) each device's floor and active
    bundle across restarts; without one, a temporary directory is used and removed.
    """

    def __init__(
        self,
        broker: BrokerSettings | str,
        fleet: str,
        devices: int | Sequence[DeviceSpec],
        *,
        trust_store: TrustStore,
        profiles: Sequence[str] = (DEFAULT_PROFILE,),
        faults: Faults | None = None,
        initial_bundle: BundleId | None = None,
        workdir: Path | None = None,
        keep_state: bool = False,
        passwords: Mapping[str, str] | None = None,
        telemetry_interval_s: float = 1.0,
        requests_per_s: float = 20.0,
        error_rate: float = 0.002,
        step_delay_s: float = 0.0,
        probation_s: float = 0.0,
        fetch_timeout_s: float = 300.0,
        loops: int | None = None,
        workers: int | None = None,
    ) -> None:
        settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(broker)
        self.broker = settings.replace(reconnect_min_s=_RETRY_MIN_S, reconnect_max_s=_RETRY_MAX_S)
        self.fleet = check_identifier(fleet, what="fleet")
        self.topics = Topics(fleet)
        specs = (
            make_device_specs(devices, profiles=profiles)
            if isinstance(devices, int)
            else list(devices)
        )
        if not specs:
            raise SimulationError("a simulated fleet needs at least one device")
        ids = [spec.device_id for spec in specs]
        if len(set(ids)) != len(ids):
            raise SimulationError("simulated device ids must be unique")
        if telemetry_interval_s < 0:
            raise SimulationError("telemetry_interval_s must be >= 0 (0 turns telemetry off)")
        self.trust_store = trust_store
        self.trust_envelope = b""
        self._trust_lock = threading.Lock()
        self.faults = faults or Faults()
        self.initial_bundle = initial_bundle
        self.passwords = dict(passwords) if passwords is not None else None
        self.telemetry_interval_s = telemetry_interval_s
        self.requests_per_s = requests_per_s
        self.error_rate = error_rate
        self.step_delay_s = step_delay_s
        self.probation_s = probation_s
        self.fetch_timeout_s = fetch_timeout_s
        self.keep_state = keep_state and workdir is not None
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edgekit-sim-"))
        self.stopping = False
        self._started = False
        self._fetchers: set[MqttBundleFetcher] = set()
        self._fetchers_lock = threading.Lock()
        count = len(specs)
        self._loops = [
            NetworkLoop(f"edgekit-sim-loop-{index}")
            for index in range(loops or max(1, min(4, math.ceil(count / 250))))
        ]
        self._workers = ThreadPoolExecutor(
            max_workers=workers or max(2, min(32, count)), thread_name_prefix="edgekit-sim"
        )
        self.fault_assignment = {
            name: frozenset(found) for name, found in self.faults.assign(ids).items()
        }
        self.devices = {  # by id, in creation order
            spec.device_id: SimulatedDevice(
                spec, fleet=self, loop=self._loops[index % len(self._loops)]
            )
            for index, spec in enumerate(specs)
        }

    def device_ids(self, *, fault: str | None = None) -> list[str]:
        """Every device id, or those with `fault` (fail_health, slow, offline, drift)."""
        if fault is None:
            return list(self.devices)
        return sorted(self.fault_assignment.get(fault, frozenset()))

    def start(self, *, wait_s: float | None = 30.0) -> SimulatedFleet:
        """Start the loops and connect every device; with `wait_s`, wait until they are online."""
        if self._started:
            return self
        self._started = True
        for loop in self._loops:
            loop.start()
        for device in self.devices.values():
            device._connect()
        if wait_s is not None:
            self.wait_connected(timeout_s=wait_s)
        return self

    def wait_connected(self, *, timeout_s: float = 30.0) -> None:
        """Wait until every device meant to be online has connected once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for device in self.devices.values():
                if device.client.refused is not None:
                    raise SimulationError(
                        f"the broker refused device {device.device_id!r} ({device.client.refused}):"
                        f" check the passwords and the broker at {self.broker.url}"
                    )
            waiting = [d for d in self.devices.values() if d.connects == 0 and d._want_online]
            if not waiting:
                return
            time.sleep(0.05)
        raise SimulationError(
            f"{len(waiting)} simulated devices did not connect to {self.broker.url} within "
            f"{timeout_s:g} s: is the broker running?"
        )

    def _apply_trust(self, payload: bytes) -> None:
        """A `trust` message: the simulated devices share one trust store, rotated as an
        agent rotates its own (the same rule, `verify_trust_message`)."""
        with self._trust_lock:
            try:
                update = verify_trust_message(
                    payload,
                    current=self.trust_store,
                    current_envelope=self.trust_envelope,
                    fleet=self.fleet,
                    now=datetime.now(timezone.utc),
                )
            except TrustUpdateError as error:
                log.warning("simulated fleet: refused a trust message: %s", first_line(error))
                return
            if update.applied:
                log.info("simulated fleet: trust store rotated to %d", update.store.version)
            self.trust_store, self.trust_envelope = update.store, update.envelope

    def _fetch(self, device: SimulatedDevice, accepted: Accepted) -> Path:
        """Fetch the directive's bundle over MQTT chunks into the device's download folder."""
        bundle = accepted.directive.bundle
        prefix = next((s.location for s in bundle.sources if s.kind == "mqtt"), None)
        if prefix is None:
            raise TransportError(
                "the directive names no MQTT source; simulated devices fetch over MQTT only"
            )
        directory = self.workdir / "devices" / device.device_id / "downloads"
        fetcher = MqttBundleFetcher(
            device.client,
            prefix,
            directory,
            sha256=bundle.sha256,
            size_bytes=bundle.size_bytes,
            max_bytes=1 << 30,
        )
        with self._fetchers_lock:
            if self.stopping:
                raise TransportError("the simulated fleet is stopping")
            self._fetchers.add(fetcher)
        try:
            return fetcher.fetch(directory / f"{bundle.sha256}.ekb", timeout_s=self.fetch_timeout_s)
        finally:
            with self._fetchers_lock:
                self._fetchers.discard(fetcher)

    def sent(self) -> SentCounts:
        """What every device sent so far (a snapshot)."""
        total = SentCounts()
        for device in self.devices.values():
            with device._lock:
                total.add(device.sent)
        return total

    def sent_by_device(self) -> dict[str, SentCounts]:
        result = {}
        for device_id, device in self.devices.items():
            with device._lock:
                result[device_id] = device.sent.copy()
        return result

    def set_telemetry_interval(self, interval_s: float) -> None:
        """Change how often devices send telemetry (0 stops it)."""
        self.telemetry_interval_s = interval_s

    def wait_idle(self, *, timeout_s: float = 30.0) -> None:
        """Wait until no directive is being processed and the broker acknowledged every
        message the devices sent (QoS 1)."""
        if not self._wait_quiet(timeout_s, directives=True):
            raise SimulationError(f"simulated devices still busy after {timeout_s:g} s")

    def _wait_quiet(self, timeout_s: float, *, directives: bool) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = any(
                (directives and d._busy) or (d.connected and d.client.unacknowledged > 0)
                for d in self.devices.values()
            )
            if not busy:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Publish offline statuses, disconnect, stop the threads; idempotent."""
        if self.stopping:
            return
        self.stopping = True
        with self._fetchers_lock:  # downloads in progress fail now, not at their timeout
            fetchers = list(self._fetchers)
        for fetcher in fetchers:
            fetcher.cancel()
        if self._started:
            # Let the broker acknowledge what was sent, so `sent()` is what it received.
            self._wait_quiet(5.0, directives=False)
            for device in self.devices.values():  # on each device's loop thread
                device._loop.call_soon(device.stop)
            for loop in self._loops:
                loop.stop()  # runs what was queued (the goodbyes) before it ends
        self._workers.shutdown(wait=True, cancel_futures=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
