"""The fleet controller: waves of signed directives, gated on what devices report.

`RolloutController.plan` selects devices from the registry (group, tags, profile), picks the
release's bundle variant for each device's profile, splits them into waves
(`edgekit.fleet.cohorts`) and records everything in the store. `RolloutController.run`
drives a recorded rollout to its end: it publishes the bundles (MQTT chunks), signs one
directive per device of the current wave with the operator's directive key, publishes them
retained (QoS 1), and reads outcomes from the retained status messages and events as the
directive-outcome contract in `edgekit.topics` says. A wave advances when its gates pass
(`edgekit.fleet.gates`); a failing gate halts the rollout and, unless told otherwise,
reverts the devices already updated with a new directive (higher sequence) naming each
device's previous bundle.

Crash safety: every directive is signed and committed to the store before it is published,
and a wave's directives are recorded in the same transaction that starts the wave. A
controller killed at any instant resumes (`run` again) by comparing the recorded envelopes
with the retained `desired` messages and publishing only those the broker does not hold, so
no device ever receives two directives for one step of a rollout.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal, cast

import msgspec

from edgekit.bundle import inspect_bundle, verify_bundle
from edgekit.contract import peek_sequence
from edgekit.errors import EdgekitError
from edgekit.files import hash_file
from edgekit.fleet.cohorts import Strategy, assign_waves, wave_fractions
from edgekit.fleet.gates import AllOf, GateResult, WaveObservation, standard_gates
from edgekit.fleet.registry import DeviceRecord, DeviceRegistry, DeviceSelector
from edgekit.fleet.store import (
    ReleaseBundle,
    RolloutRecord,
    RolloutState,
    RolloutStore,
    TargetRecord,
)
from edgekit.messages import BundleId, BundleMeta, Event, MessageError, Telemetry
from edgekit.mqtt import Inbox, Message, MqttClient, wait_all
from edgekit.topics import DeviceLeaf, Topics, parse_device_topic
from edgekit.transfer import DEFAULT_CHUNK_BYTES, MqttBundleFetcher, publish_bundle
from edgekit.trust import (
    BundleRef,
    BundleSource,
    Signer,
    TrustStore,
    build_directive,
    sign_directive,
)

__all__ = [
    "FAILURE_EVENT_KINDS",
    "Release",
    "ReleaseBundle",
    "RolloutController",
    "RolloutError",
    "RolloutOptions",
    "RolloutProgress",
    "RolloutResult",
    "WaveProgress",
    "load_release",
    "new_rollout_id",
    "publish_release",
]

logger = logging.getLogger(__name__)

FAILURE_EVENT_KINDS = frozenset({"rolled_back", "bundle_refused", "directive_refused"})
"""Events that, carrying a directive's sequence, mean the device did not take it."""

_HEARTBEAT_S = 2.0
_BASELINE_SAVE_S = 1.0  # baseline telemetry is written to the store at most this often


class RolloutError(EdgekitError):
    """A rollout cannot be planned or driven as asked."""


# ---------------------------------------------------------------------------------------------
# Release: the signed bundles a rollout ships, one per profile.


@dataclass(frozen=True)
class Release:
    """Bundles for one release, at most one per profile."""

    bundles: tuple[ReleaseBundle, ...]

    def __post_init__(self) -> None:
        if not self.bundles:
            raise RolloutError("a release needs at least one bundle")
        seen: dict[str, ReleaseBundle] = {}
        for bundle in self.bundles:
            if bundle.profile in seen:
                raise RolloutError(
                    f"two bundles of the release are built for profile {bundle.profile!r} "
                    f"({seen[bundle.profile].version} and {bundle.version}): give one per profile"
                )
            seen[bundle.profile] = bundle

    def for_profile(self, profile: str) -> ReleaseBundle | None:
        return next((b for b in self.bundles if b.profile == profile), None)

    @property
    def profiles(self) -> tuple[str, ...]:
        return tuple(b.profile for b in self.bundles)

    @property
    def label(self) -> str:
        return ", ".join(sorted({f"{b.name} {b.version}" for b in self.bundles}))


def load_release(paths: Sequence[Path], *, truststore: TrustStore | None = None) -> Release:
    """Read each bundle's manifest; with `truststore`, verify its signatures as devices will.

    Without a trust store, the layout and hashes are still checked and the bundle must carry
    at least one signature.
    """

    bundles = []
    for path in paths:
        try:
            with path.open("rb") as handle:
                if truststore is not None:
                    manifest = verify_bundle(handle, trust=truststore).manifest
                else:
                    inspection = inspect_bundle(handle)
                    manifest = inspection.manifest
                    if not inspection.signatures:
                        raise RolloutError(
                            f"bundle {path} is unsigned: devices refuse it; sign it with "
                            "`edgekit bundle sign`"
                        )
        except OSError as e:
            raise RolloutError(f"cannot read bundle {path}: {e.strerror or e}") from e
        size, sha256 = hash_file(path)
        bundles.append(
            ReleaseBundle(
                path=path.resolve(),
                sha256=sha256,
                size_bytes=size,
                name=manifest.name,
                version=manifest.version,
                profile=manifest.profile,
                security_epoch=manifest.security_epoch,
            )
        )
    return Release(tuple(bundles))


def _sources(
    bundle: ReleaseBundle, topics: Topics, *, mqtt: bool, url_templates: Sequence[str]
) -> tuple[dict[str, str], ...]:
    """Where devices fetch `bundle`, as the store keeps it (`BundleSource.to_json` entries)."""
    sources: list[BundleSource] = []
    if mqtt:
        sources.append(BundleSource("mqtt", topics.bundle_prefix(bundle.sha256)))
    for template in url_templates:
        try:
            url = template.format(
                sha256=bundle.sha256,
                name=bundle.name,
                version=bundle.version,
                profile=bundle.profile,
                filename=bundle.path.name if bundle.path else f"{bundle.sha256}.ekb",
            )
        except (KeyError, IndexError) as e:
            raise RolloutError(
                f"bundle URL template {template!r} uses an unknown field {e}: use {{sha256}}, "
                "{name}, {version}, {profile} or {filename}"
            ) from e
        if not url.startswith("https://"):
            raise RolloutError(f"bundle URL {url!r} must start with https://")
        sources.append(BundleSource("https", url))
    if not sources:
        raise RolloutError(
            "devices would have nowhere to fetch the bundle: publish it over MQTT or give "
            "--bundle-url"
        )
    return tuple(source.to_json() for source in sources)


def _source(entry: Mapping[str, str]) -> BundleSource:
    """A source as the store keeps it (`BundleSource.to_json`), back to a `BundleSource`."""
    if entry.get("kind") == "mqtt":
        return BundleSource("mqtt", entry["topic_prefix"])
    return BundleSource("https", entry["url"])


def publish_release(
    connection: MqttClient,
    store: RolloutStore,
    topics: Topics,
    bundle: ReleaseBundle,
    *,
    chunk_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BundleMeta:
    """Publish `bundle` as retained MQTT chunks (meta last) and remember it in the store."""
    if bundle.path is None or not bundle.path.is_file():
        raise RolloutError(
            f"bundle {bundle.name} {bundle.version} for {bundle.profile} must be published but "
            f"its file {bundle.path} is gone: pass it again or publish it with `edgekit fleet "
            "publish`"
        )
    meta = publish_bundle(
        connection,
        topics,
        bundle.path,
        chunk_size=chunk_size or DEFAULT_CHUNK_BYTES,
        name=bundle.name,
        version=bundle.version,
        progress=progress,
    )
    if meta.sha256 != bundle.sha256:
        raise RolloutError(f"bundle {bundle.path} changed while it was being published")
    mqtt = BundleSource("mqtt", topics.bundle_prefix(meta.sha256)).to_json()
    known = store.bundle(bundle.sha256)
    sources = () if known is None else tuple(known.sources)
    store.record_bundle(replace(bundle, sources=sources if mqtt in sources else (*sources, mqtt)))
    return meta


# ---------------------------------------------------------------------------------------------
# Options, progress, result.


@dataclass(frozen=True)
class RolloutOptions:
    """How a rollout proceeds; stored with it, so a resumed controller behaves the same."""

    strategy: Strategy = "canary"
    canary: float = 0.05
    waves: tuple[float, ...] = (0.1, 0.5, 1.0)
    growth: float = 2.0
    max_failure: float = 0.02
    max_latency_regression: float | None = None
    max_drift: float | None = None
    soak_s: float = 600.0
    report_timeout_s: float = 900.0
    revert_on_halt: bool = True
    include_offline: bool = False
    publish_mqtt: bool = True
    bundle_urls: tuple[str, ...] = ()
    directive_ttl_s: float = 7 * 24 * 3600.0
    chunk_size: int | None = None
    selector: DeviceSelector = field(default_factory=DeviceSelector)

    def to_json(self) -> dict[str, Any]:
        return cast("dict[str, Any]", msgspec.to_builtins(self))

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RolloutOptions:
        """Unknown keys are ignored, missing ones take their defaults."""
        return msgspec.convert(document, cls)

    def gates(self) -> AllOf:
        """The gates every wave must pass (raises `GateError` for out-of-range limits)."""
        return standard_gates(
            max_failure=self.max_failure,
            soak_s=self.soak_s,
            report_timeout_s=self.report_timeout_s,
            max_latency_regression=self.max_latency_regression,
            max_drift=self.max_drift,
        )

    def fractions(self) -> tuple[float, ...]:
        return wave_fractions(
            self.strategy, canary=self.canary, waves=self.waves, growth=self.growth
        )


@dataclass(frozen=True)
class WaveProgress:
    index: int
    fraction: float
    state: str
    devices: int
    succeeded: int
    failed: int
    pending: int
    detail: str


@dataclass(frozen=True)
class RolloutProgress:
    """A snapshot for progress bars and `--json`."""

    rollout_id: str
    fleet: str
    state: str
    reason: str | None
    current_wave: int
    waves: tuple[WaveProgress, ...]
    counts: Mapping[str, int]
    summary: str = ""  # what happened, in words (`halted: 1 device failed its health check; ...`)

    @property
    def total(self) -> int:
        return sum(w.devices for w in self.waves)

    @property
    def reported(self) -> int:
        return sum(w.succeeded + w.failed for w in self.waves)

    def to_json(self) -> dict[str, Any]:
        return cast("dict[str, Any]", msgspec.to_builtins(self))


@dataclass(frozen=True)
class RolloutResult:
    """How `run` ended: the rollout's final state and a final progress snapshot."""

    progress: RolloutProgress

    @property
    def state(self) -> str:
        return self.progress.state

    @property
    def revert_incomplete(self) -> bool:
        return self.progress.counts.get("revert_failed", 0) > 0


def progress_of(store: RolloutStore, rollout_id: str) -> RolloutProgress:
    """The stored state of a rollout, as a progress snapshot."""
    record = store.rollout(rollout_id)
    targets = store.targets(rollout_id)
    waves = []
    for wave in store.waves(rollout_id):
        members = [t for t in targets if t.wave == wave.wave and t.outcome != "skipped"]
        succeeded = sum(
            t.outcome in ("succeeded", "reverting", "reverted", "revert_failed")
            or (t.outcome == "no_previous" and "keeps" in (t.detail or ""))
            for t in members
        )
        failed = sum(t.outcome == "failed" for t in members)
        waves.append(
            WaveProgress(
                index=wave.wave,
                fraction=wave.fraction,
                state=wave.state,
                devices=len(members),
                succeeded=succeeded,
                failed=failed,
                pending=len(members) - succeeded - failed,
                detail=wave.detail or "",
            )
        )
    return RolloutProgress(
        rollout_id=record.id,
        fleet=record.fleet,
        state=record.state,
        reason=record.reason,
        current_wave=record.current_wave,
        waves=tuple(waves),
        counts=dict(Counter(t.outcome for t in targets)),
        summary=summarize(record, targets),
    )


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else (many or one + 's')}"


def summarize(record: RolloutRecord, targets: Sequence[TargetRecord]) -> str:
    """What a rollout did to its devices, in words: `halted: 1 device failed its health
    check and is left without a model (it ran none before); 8 devices ...; 1 skipped`."""
    labels = {
        entry.get("sha256"): f"{entry.get('name')} {entry.get('version')}"
        for entry in record.spec.get("release", [])
    }
    by: defaultdict[str, list[TargetRecord]] = defaultdict(list)
    for target in targets:
        by[target.outcome].append(target)
    parts: list[str] = []

    def label(group: Sequence[TargetRecord]) -> str:
        return ", ".join(sorted({labels.get(t.bundle_sha256) or "the release" for t in group}))

    def add(group: Sequence[TargetRecord], text: str) -> None:
        if group:
            parts.append(f"{_count(len(group), 'device')} {text}")

    still = " and keep it" if record.state in ("halted", "aborted") else ""
    add(by["succeeded"], f"updated to {label(by['succeeded'])}{still}")
    health = [t for t in by["failed"] if "health check" in (t.detail or "")]
    others = [t for t in by["failed"] if t not in health]
    for group, what in ((health, "failed its health check"), (others, "failed the update")):
        bare = sum(t.previous is None for t in group)
        text = what if len(group) == 1 else what.replace("its", "their")
        if bare == len(group) == 1:
            text += " and is left without a model (it ran none before)"
        elif bare == len(group):
            text += " and are left without a model (they ran none before)"
        elif bare:
            text += f" ({bare} of them ran no model before and are left without one)"
        add(group, text)
    add(by["reverted"], "reverted to their previous bundle")
    add(by["reverting"], "being reverted")
    kept = [t for t in by["no_previous"] if "keeps" in (t.detail or "")]
    unknown = [t for t in by["no_previous"] if t not in kept]
    keep = "keeps" if len(kept) == 1 else "keep"
    add(kept, f"that ran no model before {keep} {label(kept)} (nothing to revert to)")
    add(
        unknown,
        f"that ran no model before did not report on {label(unknown)} in time "
        "(nothing to revert to)",
    )
    why = next((t.detail for t in by["revert_failed"] if t.detail), None)
    add(by["revert_failed"], "could not be reverted" + (f" ({why})" if why else ""))
    add(by["sent"], "not reported yet")
    add(by["planned"], "never received the release" if record.terminal else "in later waves")
    if by["skipped"]:
        parts.append(f"{len(by['skipped'])} skipped (already on the release)")
    return f"{record.state}: " + ("; ".join(parts) if parts else "no devices")


def new_rollout_id() -> str:
    """`r-<UTC time>-<random>`: sortable, unique, a valid id."""
    return f"r-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def _epoch_why(previous: ReleaseBundle, current: ReleaseBundle) -> str:
    """Why a device cannot go back from `current` to `previous`."""
    return (
        f"previous bundle {previous.name} {previous.version} has security epoch "
        f"{previous.security_epoch}, below the {current.security_epoch} of {current.name} "
        f"{current.version}: a device that accepted the latter refuses bundles below its "
        "floor"
    )


# ---------------------------------------------------------------------------------------------
# The controller.


@dataclass
class _Observed:
    """What the controller heard from devices, beyond their retained statuses."""

    failed_events: dict[tuple[str, int], str] = field(default_factory=dict)
    desired: dict[str, bytes] = field(default_factory=dict)
    p95_ms: dict[str, tuple[str, float]] = field(default_factory=dict)  # device -> (sha, p95)
    baseline_p95_ms: dict[str, float] = field(default_factory=dict)  # device -> p95 on old
    # Baseline values not yet written to the store: device -> (previous sha, p95).
    unsaved_baseline: dict[str, tuple[str, float]] = field(default_factory=dict)
    drift: dict[str, tuple[str, float]] = field(default_factory=dict)


class RolloutController:
    """Plans and drives rollouts for one fleet over one broker connection."""

    def __init__(
        self,
        *,
        connection: MqttClient,
        store: RolloutStore,
        fleet: str,
        signers: Sequence[Signer] = (),
        poll_s: float = 0.2,
        heartbeat_s: float = _HEARTBEAT_S,
        on_progress: Callable[[RolloutProgress], None] | None = None,
        on_message: Callable[[str], None] | None = None,
    ) -> None:
        """`on_progress` gets a snapshot every poll; `on_message` gets a line whenever
        something happens an operator should read: what a wave waits for and until when, a
        wave that passes or halts (the CLI passes `click.echo`)."""
        self.connection = connection
        self.inbox = Inbox(connection)
        self.rejected: Counter[str] = Counter()  # device messages refused, by reason
        self.store = store
        self.topics = Topics(fleet)
        self.fleet = fleet
        self.signers = tuple(signers)
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self._last_heartbeat = 0.0
        self.on_progress = on_progress
        self.on_message = on_message
        self._said: dict[str, str] = {}  # what waits (a wave, the revert) -> the last line
        self._first_deployment = False
        self._budgets: dict[str, tuple[str, float | None]] = {}  # sha -> (profile, budget ms)
        self.registry = DeviceRegistry(self.topics)
        self._observed = _Observed()
        self._listening = False
        self._previous_sha: dict[str, str] = {}  # device -> sha it ran before the rollout
        self._driving: str | None = None  # the rollout `run` drives (baselines are its own)
        self._baseline_saved = 0.0
        self._revert_started = 0.0

    # -- listening ---------------------------------------------------------------------------

    def listen(self, *, quiet_s: float = 0.4) -> DeviceRegistry:
        """Subscribe to the fleet's status, desired, events and telemetry (once)."""
        if not self._listening:
            leaves: tuple[DeviceLeaf, ...] = ("status", "desired", "events", "telemetry")
            topics = [self.topics.all_devices(leaf) for leaf in leaves]
            messages = self.inbox.collect_retained(topics, quiet_s=quiet_s)
            self._listening = True
            self._handle(messages)
        return self.registry

    def _handle(self, messages: Sequence[Message]) -> None:
        observed = self._observed
        for message in messages:
            try:
                fleet, device, leaf = parse_device_topic(message.topic)
                if fleet != self.fleet:
                    continue
                if leaf == "status":
                    self.registry.handle(message)
                elif leaf == "desired":
                    if message.payload:
                        observed.desired[device] = message.payload
                    else:
                        observed.desired.pop(device, None)
                elif leaf == "events":
                    event = Event.from_json(message.payload)
                    if event.kind in FAILURE_EVENT_KINDS and event.sequence is not None:
                        why = f"{event.kind}: {event.reason or 'no reason given'}"
                        observed.failed_events[(device, event.sequence)] = why
                elif leaf == "telemetry":
                    telemetry = Telemetry.from_json(message.payload)
                    sha = telemetry.bundle.sha256 if telemetry.bundle else ""
                    p95 = telemetry.latency_ms.get("p95")
                    if p95 is not None and telemetry.requests > 0:
                        observed.p95_ms[device] = (sha, p95)
                        self._note_baseline(device, sha, p95)
                    if telemetry.drift_psi is not None:
                        observed.drift[device] = (sha, telemetry.drift_psi)
            except MessageError as e:  # one device's bad message never stops a rollout
                self.rejected[e.reason] += 1
                logger.debug("ignoring %s: %s", message.topic[:200], e)

    def _note_baseline(self, device: str, sha: str, p95: float) -> None:
        """Keep `p95` as `device`'s baseline if it still runs its pre-rollout bundle."""
        if self._driving is None or not sha or self._previous_sha.get(device) != sha:
            return
        observed = self._observed
        if observed.baseline_p95_ms.get(device) != p95:
            observed.baseline_p95_ms[device] = p95
            observed.unsaved_baseline[device] = (sha, p95)

    def _save_baselines(self, *, force: bool = False) -> None:
        """Persist baseline telemetry heard since the last save (one transaction, at most every
        `_BASELINE_SAVE_S`): a resumed controller compares against it once those devices run
        the new version."""
        unsaved = self._observed.unsaved_baseline
        if self._driving is None or not unsaved:
            return
        now = time.monotonic()
        if not force and now - self._baseline_saved < _BASELINE_SAVE_S:
            return
        self._baseline_saved = now
        self.store.record_baselines(
            self._driving, [(device, sha, p95) for device, (sha, p95) in unsaved.items()]
        )
        unsaved.clear()

    def _load_baselines(self, rollout_id: str) -> None:
        """The baseline recorded by earlier controllers of `rollout_id`, then what was heard
        since `listen` (devices still on their previous bundle)."""
        observed = self._observed
        observed.baseline_p95_ms.clear()
        observed.unsaved_baseline.clear()
        for device, (sha, p95) in self.store.baselines(rollout_id).items():
            if self._previous_sha.get(device) == sha:
                observed.baseline_p95_ms[device] = p95
        for device, (sha, p95) in observed.p95_ms.items():
            self._note_baseline(device, sha, p95)
        self._save_baselines(force=True)

    # -- planning ----------------------------------------------------------------------------

    def plan(
        self,
        release: Release,
        options: RolloutOptions,
        *,
        rollout_id: str | None = None,
        kind: str = "rollout",
        recorded_sources: bool = False,
    ) -> str:
        """Select devices and record a new rollout (nothing is published yet); returns its id.

        With `recorded_sources`, the release's bundles are already in the store (rollback)
        and keep the sources recorded there.
        """
        options.gates()  # out-of-range limits fail before anything is recorded
        registry = self.listen()
        selected = [
            r for r in registry.devices(options.selector) if r.online or options.include_offline
        ]
        if not selected:
            raise RolloutError(
                f"no {'' if options.include_offline else 'online '}device of fleet "
                f"{self.fleet!r} matches the selection ({len(registry)} known): check "
                "--group/--tag/--profile and `edgekit fleet devices`"
            )
        missing = Counter(
            r.profile or "(none)" for r in selected if release.for_profile(r.profile) is None
        )
        if missing:
            listed = ", ".join(f"{count} x {profile}" for profile, count in sorted(missing.items()))
            raise RolloutError(
                f"the release ({', '.join(release.profiles)}) has no bundle for selected devices' "
                f"profiles: {listed}; add a bundle per profile or narrow the selection with "
                "--profile"
            )
        if options.revert_on_halt:
            self._check_revertable(release, selected)
        fractions = options.fractions()
        to_update = {
            r.device: r.profile
            for r in selected
            if r.active is None or r.active.sha256 != release.for_profile(r.profile).sha256  # type: ignore[union-attr]
        }
        waves = assign_waves(to_update, fractions) if to_update else []
        wave_of = {device: index for index, wave in enumerate(waves) for device in wave}
        targets = []
        for record in selected:
            bundle = release.for_profile(record.profile)
            assert bundle is not None  # checked above
            previous = record.active.to_dict() if record.active else None
            index = wave_of.get(record.device, -1)
            outcome = "planned" if index >= 0 else "skipped"
            targets.append((record.device, record.profile, index, bundle.sha256, previous, outcome))
        # The fraction shown per wave: the cumulative share its last device reaches.
        reached = accumulate(len(wave) for wave in waves)
        wave_rows = [
            (done / len(to_update), wave) for done, wave in zip(reached, waves, strict=True)
        ]
        for bundle in () if recorded_sources else release.bundles:
            sources = _sources(
                bundle, self.topics, mqtt=options.publish_mqtt, url_templates=options.bundle_urls
            )
            self.store.record_bundle(replace(bundle, sources=sources))
        rollout_id = rollout_id or new_rollout_id()
        spec = {
            "options": options.to_json(),
            "release": [
                {**asdict(b), "path": str(b.path) if b.path else None} for b in release.bundles
            ],
        }
        self.store.create_rollout(
            rollout_id=rollout_id,
            fleet=self.fleet,
            kind=kind,
            spec=spec,
            waves=wave_rows,
            targets=targets,
        )
        if not waves:
            self.store.set_state(
                rollout_id, "completed", reason="every selected device already runs the release"
            )
        logger.info(
            "planned rollout %s: %d devices in %d waves", rollout_id, len(to_update), len(waves)
        )
        return rollout_id

    def _check_revertable(self, release: Release, selected: Sequence[DeviceRecord]) -> None:
        """Refuse `--revert-on-halt` when a revert could only be refused by the devices.

        A device that accepts the release raises its security floor to the release's epoch and
        refuses any bundle below it ever after, so a previous bundle of a lower epoch cannot be
        reverted to.
        """
        previous: dict[str, tuple[BundleId, ReleaseBundle]] = {}
        for record in selected:
            bundle = release.for_profile(record.profile)
            if bundle is not None and record.active and record.active.sha256 != bundle.sha256:
                previous.setdefault(record.active.sha256, (record.active, bundle))
        blocked = []
        for sha256, (active, bundle) in sorted(previous.items()):
            found = self._previous_bundle(sha256)
            if found is None:
                logger.warning(
                    "devices run %s %s (%s), which is neither recorded in %s nor published on "
                    "the broker: they cannot be reverted if the rollout halts",
                    active.name,
                    active.version,
                    sha256[:12],
                    self.store.path,
                )
            elif found.security_epoch < bundle.security_epoch:
                blocked.append(_epoch_why(found, bundle))
        if blocked:
            raise RolloutError(
                f"--revert-on-halt cannot work: {blocked[0]}"
                + (f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else "")
                + "; pass --no-revert and roll forward with a fixed release if it halts, or "
                "re-sign the previous version with a security epoch at least the release's"
            )

    # -- driving -----------------------------------------------------------------------------

    def run(self, rollout_id: str, *, stop_when: Callable[[], bool] | None = None) -> RolloutResult:
        """Drive `rollout_id` until it completes, halts or is aborted (or `stop_when()`)."""
        record = self.store.rollout(rollout_id)
        if record.fleet != self.fleet:
            raise RolloutError(f"rollout {rollout_id} belongs to fleet {record.fleet!r}")
        if record.terminal:
            return RolloutResult(progress_of(self.store, rollout_id))
        self.store.claim(rollout_id)
        try:
            return self._drive(record, stop_when)
        finally:
            self._driving = None
            self.store.release(rollout_id)

    def _options(self, record: RolloutRecord) -> RolloutOptions:
        return RolloutOptions.from_json(record.spec["options"])

    def _drive(self, record: RolloutRecord, stop_when: Callable[[], bool] | None) -> RolloutResult:
        rollout_id = record.id
        options = self._options(record)
        gates = options.gates()
        self.listen()
        targets = self.store.targets(rollout_id)
        self._previous_sha = {t.device: (t.previous or {}).get("sha256", "") for t in targets}
        self._driving = rollout_id
        # No device the rollout updates ran a model before it: nothing to regress from.
        updated = [t for t in targets if t.outcome != "skipped"]
        self._first_deployment = bool(updated) and all(t.previous is None for t in updated)
        self._said = {}
        if self._first_deployment and options.max_latency_regression is not None:
            note = self._budget_note({t.bundle_sha256 for t in targets})
            self._say(
                "no baseline: first deployment (no selected device ran a model before), so "
                f"latency is judged against {note} instead of a regression"
            )
        self._load_baselines(rollout_id)
        self._revert_started = 0.0
        self._last_heartbeat = 0.0
        self._publish_bundles(record, options)
        self._republish_missing(rollout_id)
        while True:
            record = self.store.rollout(rollout_id)
            self._apply_request(record)
            record = self.store.rollout(rollout_id)
            if record.terminal:
                break
            if record.state != "paused":
                self._said.pop("paused", None)
            if record.state == "running":
                self._step_wave(record, options, gates)
            elif record.state == "reverting":
                self._step_revert(record, options)
            elif record.state == "paused":
                self._update_outcomes(rollout_id)
                self._say_once(
                    "paused",
                    f"paused: no new wave starts until `edgekit fleet resume {rollout_id}`",
                )
            if self.on_progress is not None:
                self.on_progress(progress_of(self.store, rollout_id))
            if stop_when is not None and stop_when():
                break
            self._heartbeat(rollout_id)
            self._handle(self.inbox.drain(timeout_s=self.poll_s))
            self._save_baselines()
        self._save_baselines(force=True)
        final = progress_of(self.store, rollout_id)
        if self.on_progress is not None:
            self.on_progress(final)
        return RolloutResult(final)

    def _heartbeat(self, rollout_id: str, *, force: bool = False) -> None:
        """Tell the store this controller is alive (at most every `heartbeat_s`); raises
        `OwnershipLostError` when another controller took the rollout over."""
        now = time.monotonic()
        if force or now - self._last_heartbeat >= self.heartbeat_s:
            self.store.heartbeat(rollout_id)
            self._last_heartbeat = now

    def _publish_bundles(self, record: RolloutRecord, options: RolloutOptions) -> None:
        if not options.publish_mqtt:
            return
        shas = {t.bundle_sha256 for t in self.store.targets(record.id) if t.outcome == "planned"}
        for entry in record.spec["release"]:
            if entry["sha256"] not in shas or self._meta_on_broker(entry["sha256"]) is not None:
                continue  # retained on the broker already (a resumed rollout, `fleet publish`)
            path = Path(entry["path"]) if entry["path"] else None
            bundle = ReleaseBundle(
                **{**entry, "path": path, "sources": tuple(entry.get("sources", ()))}
            )
            logger.info("publishing bundle %s (%d bytes)", bundle.sha256[:12], bundle.size_bytes)
            # A large bundle takes a while: keep the heartbeat going, so nobody takes the
            # rollout over meanwhile, and stop early if somebody did.
            publish_release(
                self.connection,
                self.store,
                self.topics,
                bundle,
                chunk_size=options.chunk_size,
                progress=lambda _done, _total: self._heartbeat(record.id),
            )
            self._heartbeat(record.id, force=True)

    def _republish_missing(self, rollout_id: str) -> None:
        """After a restart: publish recorded directives the broker does not hold (yet)."""
        missing = []
        for target in self.store.targets(rollout_id):
            envelope = {"sent": target.envelope, "reverting": target.revert_envelope}.get(
                target.outcome
            )
            if envelope is None:
                continue
            retained = self._observed.desired.get(target.device)
            sequence = peek_sequence(envelope) or 0
            if retained is None or (peek_sequence(retained) or 0) < sequence:
                logger.info("re-publishing the recorded directive for %s", target.device)
                missing.append((target.device, sequence, envelope))
        self._publish_directives(missing)

    def _apply_request(self, record: RolloutRecord) -> None:
        request = self.store.take_request(record.id)
        if request is None:
            return
        if request == "pause" and record.state == "running":
            self.store.set_state(record.id, "paused", reason="paused by the operator")
        elif request == "resume" and record.state == "paused":
            self.store.set_state(record.id, "running", reason="resumed by the operator")
        elif request == "abort":
            self.store.set_state(record.id, "aborted", reason="aborted by the operator")
        elif request == "abort_revert":
            self._start_revert(record, reason="aborted by the operator; reverting", then="aborted")

    def _sign(
        self,
        record: RolloutRecord,
        options: RolloutOptions,
        pairs: Sequence[tuple[str, ReleaseBundle]],
    ) -> list[tuple[str, int, bytes]]:
        """(device, sequence, envelope) naming each (device, bundle): new sequences above every
        one seen on the broker, the bundle's security epoch as the device's floor."""
        if not pairs:
            return []
        if not self.signers:
            raise RolloutError("no directive key: pass --key NAME (a key of the directives role)")
        seen = [r.last_sequence for r in self.registry.devices()]
        seen += [peek_sequence(e) or 0 for e in self._observed.desired.values()]
        first = self.store.allocate_sequences(self.fleet, len(pairs), at_least=max(seen, default=0))
        directives = []
        for sequence, (device, bundle) in enumerate(pairs, start=first):
            directive = build_directive(
                fleet=self.fleet,
                device=device,
                rollout_id=record.id,
                sequence=sequence,
                bundle=BundleRef(
                    sha256=bundle.sha256,
                    size_bytes=bundle.size_bytes,
                    name=bundle.name,
                    version=bundle.version,
                    sources=tuple(_source(entry) for entry in bundle.sources),
                ),
                min_security_epoch=bundle.security_epoch,
                issued_at=datetime.now(timezone.utc),
                ttl_s=options.directive_ttl_s,
            )
            directives.append((device, sequence, sign_directive(directive, self.signers)))
        return directives

    def _bundle(self, sha256: str) -> ReleaseBundle:
        found = self.store.bundle(sha256)
        if found is None:
            raise RolloutError(f"bundle {sha256[:12]} is not recorded in {self.store.path}")
        return found

    def _publish_directives(self, directives: Sequence[tuple[str, int, bytes]]) -> None:
        """Publish (device, sequence, envelope) retained, QoS 1, and wait for the broker."""
        handles = [
            self.connection.publish(self.topics.desired(device), envelope, qos=1, retain=True)
            for device, _, envelope in directives
        ]
        wait_all(handles, timeout_s=60.0, what="the directives")
        for device, _, envelope in directives:
            self._observed.desired[device] = envelope

    def _prepare_wave(
        self, record: RolloutRecord, options: RolloutOptions, wave: int
    ) -> list[tuple[str, int, bytes]]:
        """Sign the wave's directives and record them (the wave starts); nothing published."""
        targets = [t for t in self.store.targets(record.id, wave=wave) if t.outcome == "planned"]
        directives = self._sign(
            record, options, [(t.device, self._bundle(t.bundle_sha256)) for t in targets]
        )
        if directives:
            self.store.record_directives(record.id, directives, start_wave=wave)
        else:
            self.store.update_wave(record.id, wave, state="active", started_at=time.time())
        return directives

    def _start_wave(self, record: RolloutRecord, options: RolloutOptions, wave: int) -> None:
        directives = self._prepare_wave(record, options, wave)
        logger.info("rollout %s: wave %d to %d devices", record.id, wave, len(directives))
        self._publish_directives(directives)

    def _outcome(self, target: TargetRecord) -> tuple[str, str | None] | None:
        """(outcome, detail) of a `sent` (`succeeded`|`failed`) or `reverting` (`reverted`|
        `revert_failed`) target once its device reported on the directive."""
        revert = target.outcome == "reverting"
        sequence = target.revert_sequence if revert else target.sequence
        if sequence is None:
            return None
        wanted = (target.previous or {}).get("sha256") if revert else target.bundle_sha256
        succeeded, failed = ("reverted", "revert_failed") if revert else ("succeeded", "failed")
        why = self._observed.failed_events.get((target.device, sequence))
        if why is not None:
            return failed, why
        status = self.registry.get(target.device)
        if status is None or status.last_sequence < sequence:
            return None
        if status.state == "committed" and status.active and status.active.sha256 == wanted:
            return succeeded, None
        if status.state == "rolled_back":
            return failed, "rolled_back"
        return None

    def _update_outcomes(self, rollout_id: str, *, wave: int | None = None) -> list[TargetRecord]:
        """Record what devices reported on their directives; returns the updated targets."""
        changes = []
        for target in self.store.targets(rollout_id, wave=wave):
            found = self._outcome(target) if target.outcome in ("sent", "reverting") else None
            if found is not None:
                changes.append((target.device, *found))
        self.store.set_outcomes(rollout_id, changes)
        return self.store.targets(rollout_id, wave=wave)

    def _observation(
        self, targets: Sequence[TargetRecord], started_at: float, settled_at: float | None
    ) -> WaveObservation:
        now = time.time()
        # Only devices that committed the new bundle speak for it (one value per device).
        wave_devices = {t.device: t.bundle_sha256 for t in targets if t.outcome == "succeeded"}
        latency = [
            (p95, sha)
            for device, (sha, p95) in self._observed.p95_ms.items()
            if wave_devices.get(device) == sha
        ]
        drift = [
            psi
            for device, (sha, psi) in self._observed.drift.items()
            if wave_devices.get(device) == sha
        ]
        return WaveObservation(
            targeted=len(targets),
            succeeded=len(wave_devices),
            failed=sum(t.outcome == "failed" for t in targets),
            elapsed_s=now - started_at,
            settled_s=None if settled_at is None else now - settled_at,
            new_p95_ms=tuple(p95 for p95, _ in latency),
            baseline_p95_ms=tuple(self._observed.baseline_p95_ms.values()),
            drift_psi=tuple(drift),
            first_deployment=self._first_deployment,
            new_p95_budget_ms=tuple(self._budget(sha)[1] for _, sha in latency),
            budget_note=self._budget_note({sha for _, sha in latency}),
        )

    def _budget(self, sha256: str) -> tuple[str, float | None]:
        """(profile, p95 latency budget in ms) of a recorded bundle: its profile's
        `budgets.max_latency_ms`; None when the profile is not one this machine knows."""
        if sha256 not in self._budgets:
            from edgekit.profiles import load_profile

            bundle = self.store.bundle(sha256)
            profile = bundle.profile if bundle is not None else ""
            budget = None
            if profile:
                try:
                    budget = load_profile(profile).budgets.max_latency_ms
                except EdgekitError as e:
                    logger.info("no latency budget for profile %r: %s", profile, e)
            self._budgets[sha256] = (profile, budget)
        return self._budgets[sha256]

    def _budget_note(self, shas: set[str]) -> str:
        """Where a first deployment's latency budgets come from, e.g. `the latency budget of
        profile raspberrypi (200 ms)`."""
        if not shas:
            return ""
        known = sorted({self._budget(sha) for sha in shas}, key=lambda item: item[0])
        budgets = [f"{profile} ({budget:g} ms)" for profile, budget in known if budget]
        unknown = [profile for profile, budget in known if not budget]
        if not budgets:
            return "no latency budget (none known for profile " + ", ".join(unknown) + ")"
        noun = "budget of profile" if len(budgets) == 1 else "budgets of profiles"
        text = f"the latency {noun} {', '.join(budgets)}"
        if unknown:
            text += f"; not judged for {', '.join(unknown)} (no budget)"
        return text

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.on_message is not None:
            self.on_message(line)

    def _say_waiting(self, wave: int, result: GateResult, started_at: float) -> None:
        """`wave 0: waiting for latency_regression (...) until 21:18:03, then it halts`,
        once per change."""
        parts = []
        for leaf in result.waiting:
            text = f"{leaf.gate} ({leaf.detail})"
            if leaf.deadline_s is not None:
                until = time.strftime("%H:%M:%S", time.localtime(started_at + leaf.deadline_s))
                text += f" until {until}"
                if leaf.on_deadline == "fail":
                    text += ", then it halts"
            parts.append(text)
        self._say_once(f"wave {wave}", f"wave {wave}: waiting for " + "; ".join(parts))

    def _say_once(self, key: str, line: str) -> None:
        """Say `line` unless it is what was last said about `key`."""
        if self._said.get(key) != line:
            self._said[key] = line
            self._say(line)

    def _step_wave(self, record: RolloutRecord, options: RolloutOptions, gates: AllOf) -> None:
        waves = self.store.waves(record.id)
        if record.current_wave >= len(waves):
            self.store.set_state(record.id, "completed", reason="every wave passed its gates")
            return
        wave = waves[record.current_wave]
        if wave.state == "planned":
            self._start_wave(record, options, wave.wave)
            return
        targets = self._update_outcomes(record.id, wave=wave.wave)
        settled_at = wave.settled_at
        if settled_at is None and all(t.outcome in ("succeeded", "failed") for t in targets):
            settled_at = time.time()
            self.store.update_wave(record.id, wave.wave, state="active", settled_at=settled_at)
        result: GateResult = gates.evaluate(
            self._observation(targets, wave.started_at or time.time(), settled_at)
        )
        if result.verdict == "wait":
            self.store.update_wave(record.id, wave.wave, state="active", detail=result.detail)
            self._say_waiting(wave.wave, result, wave.started_at or time.time())
            return
        if result.verdict == "pass":
            self.store.update_wave(
                record.id, wave.wave, state="passed", finished_at=time.time(), detail=result.detail
            )
            self._say(f"wave {wave.wave} passed: {result.detail}")
            next_wave = wave.wave + 1
            if next_wave < len(waves):
                self.store.set_state(record.id, "running", current_wave=next_wave)
            else:
                reason = "every wave passed its gates"
                self.store.set_state(record.id, "completed", reason=reason, current_wave=next_wave)
            return
        reason = f"wave {wave.wave} halted: " + "; ".join(
            f"{leaf.gate}: {leaf.detail}" for leaf in result.failures
        )
        self.store.update_wave(
            record.id, wave.wave, state="failed", finished_at=time.time(), detail=result.detail
        )
        logger.warning("rollout %s: %s", record.id, reason)
        if self.on_message is not None:
            self.on_message(reason)
        if options.revert_on_halt:
            self._start_revert(record, reason=reason, then="halted")
        else:
            self.store.set_state(record.id, "halted", reason=reason)

    def _start_revert(
        self, record: RolloutRecord, *, reason: str, then: Literal["halted", "aborted"]
    ) -> None:
        """Sign and publish a directive naming each updated device's previous bundle."""
        targets = [t for t in self.store.targets(record.id) if t.outcome in ("sent", "succeeded")]
        revertable: list[tuple[str, ReleaseBundle]] = []
        unrevertable: list[tuple[str, str]] = []
        for target in targets:
            if target.previous is None:
                continue
            bundle = self._previous_bundle(target.previous["sha256"])
            if bundle is None:
                why = (
                    f"previous bundle {target.previous['sha256'][:12]} is unknown here and not "
                    "published on the broker"
                )
                unrevertable.append((target.device, why))
                continue
            current = self._bundle(target.bundle_sha256)
            if bundle.security_epoch < current.security_epoch:
                unrevertable.append((target.device, _epoch_why(bundle, current)))
            else:  # its epoch, the revert's floor, is then >= the forward directive's floor
                revertable.append((target.device, bundle))
        directives = self._sign(record, self._options(record), revertable)
        # Nothing to revert to: those that committed keep the release; those still on their
        # way stay `sent` until they report (or the report timeout), see `_step_revert`.
        no_previous = [
            (t.device, self._kept_detail(t))
            for t in targets
            if t.previous is None and t.outcome == "succeeded"
        ]
        self.store.begin_revert(
            record.id,
            reason=reason,
            then=then,
            directives=directives,
            unrevertable=unrevertable,
            no_previous=no_previous,
        )
        if directives:
            logger.info("rollout %s: reverting %d devices", record.id, len(directives))
            self._publish_directives(directives)
        self._revert_started = time.time()

    def _meta_on_broker(self, sha256: str) -> BundleMeta | None:
        """The bundle's retained meta, if the broker holds one."""
        topic = self.topics.bundle(sha256).meta
        try:
            messages = self.inbox.collect_retained([topic], quiet_s=0.3, timeout_s=3, keep=False)
        finally:
            self.connection.unsubscribe([topic])
        # Device messages that arrived meanwhile still count.
        self._handle([m for m in messages if m.topic != topic])
        payload = next((m.payload for m in messages if m.topic == topic and m.payload), None)
        try:
            return None if payload is None else BundleMeta.from_json(payload)
        except MessageError:
            return None

    def _previous_bundle(self, sha256: str) -> ReleaseBundle | None:
        """The bundle a revert names: from the store, or one someone else published: fetch its
        chunks, read the manifest (its real security epoch) and record it; None if the broker
        does not hold it whole."""
        known = self.store.bundle(sha256)
        if known is not None:
            return known
        meta = self._meta_on_broker(sha256)
        if meta is None:
            return None
        prefix = self.topics.bundle_prefix(meta.sha256)
        with tempfile.TemporaryDirectory(prefix="edgekit-previous-") as folder:
            fetcher = MqttBundleFetcher(
                self.connection,
                prefix,
                Path(folder),
                sha256=meta.sha256,
                size_bytes=meta.size_bytes,
                max_bytes=meta.size_bytes,
            )
            try:
                path = fetcher.fetch(Path(folder) / f"{meta.sha256}.ekb", timeout_s=120)
                with path.open("rb") as handle:
                    manifest = inspect_bundle(handle).manifest
            except (EdgekitError, OSError) as e:  # TransferError is an EdgekitError
                logger.warning("cannot read bundle %s from the broker: %s", sha256[:12], e)
                return None
        record = ReleaseBundle(
            sha256=meta.sha256,
            name=manifest.name,
            version=manifest.version,
            profile=manifest.profile,
            size_bytes=meta.size_bytes,
            security_epoch=manifest.security_epoch,
            sources=(BundleSource("mqtt", prefix).to_json(),),
        )
        self.store.record_bundle(record)
        return record

    def _kept_detail(self, target: TargetRecord) -> str:
        bundle = self._bundle(target.bundle_sha256)
        return (
            f"ran no model before this rollout: nothing to revert to; keeps {bundle.name} "
            f"{bundle.version}"
        )

    def _step_revert(self, record: RolloutRecord, options: RolloutOptions) -> None:
        targets = self._update_outcomes(record.id)
        # Devices that ran no model before and just reported on the release keep it.
        self.store.set_outcomes(
            record.id,
            [
                (t.device, "no_previous", self._kept_detail(t))
                for t in targets
                if t.outcome == "succeeded" and t.previous is None
            ],
        )
        pending = [t for t in targets if t.outcome in ("reverting", "sent")]
        # Devices whose forward directive is still in flight may finish it first; their revert
        # directive (a higher sequence) then follows.
        if not self._revert_started:
            self._revert_started = record.updated_at
        timed_out = time.time() - self._revert_started > options.report_timeout_s
        if pending and not timed_out:
            deadline = time.localtime(self._revert_started + options.report_timeout_s)
            until = time.strftime("%H:%M:%S", deadline)
            reverting = sum(t.outcome == "reverting" for t in pending)
            fresh = len(pending) - reverting
            waits = [f"{_count(reverting, 'device')} to report on the revert"] if reverting else []
            if fresh:
                waits.append(
                    f"{_count(fresh, 'device')} that ran no model before to report on the release"
                )
            self._say_once("revert", f"reverting: waiting for {' and '.join(waits)} until {until}")
            return
        late = {  # what a device that did not report in time ends as
            "reverting": ("revert_failed", "did not report on the revert in time"),
            "sent": (
                "no_previous",
                "ran no model before this rollout: nothing to revert to; did not report on the "
                "release in time",
            ),
        }
        self.store.set_outcomes(record.id, [(t.device, *late[t.outcome]) for t in pending])
        then: RolloutState = "aborted" if record.after_revert == "aborted" else "halted"
        self.store.set_state(record.id, then)

    # -- rollback --to VERSION ---------------------------------------------------------------

    def plan_rollback(
        self,
        version: str,
        *,
        selector: DeviceSelector,
        name: str | None = None,
        report_timeout_s: float = 900.0,
    ) -> str:
        """A rollout (kind `rollback`, strategy `all`) to the recorded bundles of `version`."""
        records = self.store.bundles_by_version(version, name=name)
        if not records:
            raise RolloutError(
                f"no bundle of version {version} is recorded in {self.store.path}: roll back to "
                "a version a rollout or `edgekit fleet publish` used, or run a rollout with its "
                "bundles"
            )
        profiles: dict[str, ReleaseBundle] = {}
        for record in records:
            profiles.setdefault(record.profile, record)
        release = Release(tuple(profiles.values()))
        options = RolloutOptions(
            strategy="all",
            max_failure=1.0,
            soak_s=0.0,
            report_timeout_s=report_timeout_s,
            revert_on_halt=False,
            publish_mqtt=any(s.get("kind") == "mqtt" for r in profiles.values() for s in r.sources),
            selector=selector,
        )
        return self.plan(release, options, kind="rollback", recorded_sources=True)
