"""Helpers for the fleet tool tests (simulator, broker config, monitor): keys, trust store,
bundles published over MQTT and signed directives. A uniquely named module, not a conftest."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgekit.bundle import build_bundle, collect_bundle_inputs
from edgekit.messages import BundleId
from edgekit.mqtt import BrokerSettings, Message, MqttClient
from edgekit.topics import Topics
from edgekit.transfer import publish_bundle
from edgekit.trust import (
    BundleRef,
    BundleSource,
    Signer,
    TrustStore,
    build_directive,
    create_truststore,
    sign_directive,
)

CREATED = datetime(2025, 1, 31, 12, 0, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class FleetKeys:
    root: Signer
    bundles: Signer
    directives: Signer
    truststore: TrustStore


def make_keys() -> FleetKeys:
    root, bundles, directives = Signer.generate(), Signer.generate(), Signer.generate()
    store = create_truststore(
        root_keys=[root.public_key],
        bundles_keys=[bundles.public_key],
        directives_keys=[directives.public_key],
    )
    return FleetKeys(root, bundles, directives, store)


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    active: BundleId
    size_bytes: int


def make_bundle(
    folder: Path,
    keys: FleetKeys,
    *,
    version: str,
    profile: str = "x86-64",
    model_bytes: int = 4096,
    name: str = "digits",
) -> BuiltBundle:
    """A signed bundle whose model is `model_bytes` of pseudo-random bytes."""
    source = folder / f"src-{name}-{version}-{profile}"
    source.mkdir(parents=True, exist_ok=True)
    seed = f"{name}{version}{profile}".encode()
    (source / "model.onnx").write_bytes((seed * (model_bytes // len(seed) + 1))[:model_bytes])
    (source / "golden.npz").write_bytes(b"golden" * 20)
    (source / "reference_stats.json").write_text('{"mean": [0.5]}')
    (source / "report.json").write_text(json.dumps({"profile": profile}))
    path = build_bundle(
        collect_bundle_inputs(source),
        out_path=folder / f"{name}-{version}-{profile}.ekb",
        name=name,
        version=version,
        security_epoch=0,
        profile=profile,
        signers=[keys.bundles],
        created=CREATED,
    )
    data = path.read_bytes()
    return BuiltBundle(path, BundleId(name, version, hashlib.sha256(data).hexdigest()), len(data))


@contextmanager
def operator_client(
    host: str,
    port: int,
    *,
    client_id: str = "",
    user: str | None = None,
    password: str | None = None,
) -> Iterator[MqttClient]:
    """A connected `MqttClient` (edgekit's seam), stopped on exit."""
    settings = BrokerSettings(f"mqtt://{host}:{port}", username=user, password=password)
    name = client_id or f"edgekit-op-{os.getpid()}-{time.monotonic_ns()}"
    client = MqttClient(settings, client_id=name).connect(timeout_s=10)
    try:
        yield client
    finally:
        client.stop()


def directive_for(
    keys: FleetKeys,
    topics: Topics,
    device: str,
    bundle: BuiltBundle,
    *,
    sequence: int,
    rollout_id: str = "r1",
    signer: Signer | None = None,
    issued_at: datetime | None = None,
) -> bytes:
    issued = issued_at or datetime.now(timezone.utc)
    directive = build_directive(
        fleet=topics.fleet,
        device=device,
        rollout_id=rollout_id,
        sequence=sequence,
        bundle=BundleRef(
            sha256=bundle.active.sha256,
            size_bytes=bundle.size_bytes,
            name=bundle.active.name,
            version=bundle.active.version,
            sources=(BundleSource("mqtt", topics.bundle_prefix(bundle.active.sha256)),),
        ),
        min_security_epoch=0,
        issued_at=issued,
        expires_at=issued + timedelta(hours=1),
    )
    return sign_directive(directive, [signer or keys.directives])


def publish(
    client: MqttClient, topics: Topics, bundle: BuiltBundle, *, chunk_size: int = 64 * 1024
) -> None:
    publish_bundle(client, topics, bundle.path, chunk_size=chunk_size)


def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class FleetWatcher:
    """Records every status, event and telemetry message of a fleet (for assertions)."""

    def __init__(self, client: MqttClient, topics: Topics) -> None:
        import threading

        from edgekit.messages import Event, Status, Telemetry
        from edgekit.topics import parse_device_topic

        self.statuses: dict[str, Status] = {}
        self.events: list[Event] = []
        self.telemetry: list[Telemetry] = []
        self._lock = threading.Lock()

        def on_message(message: Message) -> None:
            if not message.payload:
                return
            _fleet, device, leaf = parse_device_topic(message.topic)
            with self._lock:
                if leaf == "status":
                    self.statuses[device] = Status.from_json(message.payload)
                elif leaf == "events":
                    self.events.append(Event.from_json(message.payload))
                elif leaf == "telemetry":
                    self.telemetry.append(Telemetry.from_json(message.payload))

        filters = [topics.all_devices(leaf) for leaf in ("status", "events", "telemetry")]
        client.subscribe(filters, on_message, wait_s=10)

    def events_of(self, device: str, kind: str | None = None) -> list[object]:
        with self._lock:
            return [
                e for e in self.events if e.device == device and (kind is None or e.kind == kind)
            ]

    def settled(self, devices: list[str], sequence: int) -> bool:
        """Every device reached an outcome (per the topics contract) for `sequence`."""
        with self._lock:
            for device in devices:
                status = self.statuses.get(device)
                if status is None or status.last_sequence < sequence:
                    refused = any(
                        e.device == device
                        and e.sequence == sequence
                        and e.kind == "directive_refused"
                        for e in self.events
                    )
                    if not refused:
                        return False
                elif status.state not in ("committed", "rolled_back"):
                    return False
            return True


def send_directives(
    client: MqttClient,
    keys: FleetKeys,
    topics: Topics,
    devices: Iterable[str],
    bundle: BuiltBundle,
    *,
    sequence: int,
    rollout_id: str = "r1",
) -> None:
    """Publish (retained) a signed directive naming `bundle` to each device."""
    for device in devices:
        payload = directive_for(
            keys, topics, device, bundle, sequence=sequence, rollout_id=rollout_id
        )
        client.publish(topics.desired(device), payload, qos=1, retain=True)
