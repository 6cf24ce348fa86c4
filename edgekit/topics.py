"""MQTT topics and message schemas: the one vocabulary the agent, the fleet controller and the
monitor share.

Every topic lives under `edgekit/v1/<fleet>/`. Every JSON payload carries a `schema` field
(`edgekit.<kind>/v1`), the `fleet` and `device` it is about, and the bundle version and
`rollout_id` where one applies. Bundle chunks are the one binary payload: raw bytes of the
`.ekb` file, described by the JSON `bundles/<sha>/meta` message. `docs/asyncapi.yaml` documents
the same messages for people and tools.

How the fleet controller reads the outcome of a directive (sequence S, bundle sha B), the
contract between `edgekit-agent`, `edgekit fleet simulate` and `edgekit fleet rollout`:
- success: the retained status reaches `state == "committed"` with `active.sha256 == B` and
  `last_sequence >= S`;
- failure: the retained status reaches `state == "rolled_back"` with `last_sequence >= S`, or
  an event with `kind` in {"rolled_back", "bundle_refused", "directive_refused"} carrying
  `sequence == S` (a refused directive is never accepted, so it cannot raise last_sequence).
In between, the agent publishes a `state` event and an updated status at every transition.

Parsing is strict about what it needs and tolerant of fields it does not know (a newer agent
may add some), so a fleet can run mixed agent versions. Pure module: stdlib only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from edgekit.errors import EdgekitError

__all__ = [
    "AGENT_STATES",
    "BUNDLE_META_SCHEMA",
    "EVENT_KINDS",
    "EVENT_SCHEMA",
    "STATUS_SCHEMA",
    "TELEMETRY_SCHEMA",
    "ActiveBundle",
    "BundleMeta",
    "Event",
    "MessageError",
    "Status",
    "Telemetry",
    "Topics",
    "check_identifier",
    "parse_device_topic",
]

TOPIC_ROOT = "edgekit/v1"
STATUS_SCHEMA = "edgekit.status/v1"
EVENT_SCHEMA = "edgekit.event/v1"
TELEMETRY_SCHEMA = "edgekit.telemetry/v1"
BUNDLE_META_SCHEMA = "edgekit.bundle-meta/v1"

AgentState = Literal[
    "idle",
    "downloading",
    "verifying",
    "installing",
    "checking",
    "activating",
    "probation",
    "committed",
    "rolled_back",
]
AGENT_STATES: tuple[str, ...] = get_args(AgentState)
"""The updater's states, in DESIGN.md's order ("Agent state machine")."""

EVENT_KINDS: tuple[str, ...] = (
    "agent_started",
    "directive_accepted",
    "directive_refused",
    "state",  # a state transition; `state` names the new state
    "download_resumed",
    "health_check",  # `details` holds the check's measurements, `ok` says whether it passed
    "committed",
    "rolled_back",  # `reason` says why
    "bundle_refused",  # signature, hash, manifest or profile mismatch; `reason` says which
    "error",  # the agent kept serving but something needs attention (disk full, journal)
)
"""Kinds of `devices/<id>/events` messages. Consumers must ignore kinds they do not know."""

# Fleet and device ids become topic levels: no wildcards, separators or control characters.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MessageError(EdgekitError):
    """An MQTT payload or topic that does not follow the edgekit schemas."""


def check_identifier(value: str, *, what: str) -> str:
    """Return `value` if it can be an MQTT topic level for a fleet or device id."""
    if not _IDENTIFIER.fullmatch(value):
        raise MessageError(
            f"{what} {value[:80]!r} is not a valid id: use 1-128 letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one fleet (`edgekit/v1/<fleet>/...`)."""

    fleet: str

    def __post_init__(self) -> None:
        check_identifier(self.fleet, what="fleet")

    @property
    def prefix(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def _device(self, device: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{check_identifier(device, what='device')}/{leaf}"

    def status(self, device: str) -> str:
        """Retained, QoS 1, written by the agent (its last will says offline)."""
        return self._device(device, "status")

    def desired(self, device: str) -> str:
        """Retained, QoS 1, written by the fleet controller: a signed directive envelope."""
        return self._device(device, "desired")

    def events(self, device: str) -> str:
        """Not retained, QoS 1, written by the agent."""
        return self._device(device, "events")

    def telemetry(self, device: str) -> str:
        """Not retained, QoS 1 (0 allowed), written by the agent."""
        return self._device(device, "telemetry")

    def bundle_prefix(self, sha256: str) -> str:
        """The `topic_prefix` a directive's MQTT source names for a bundle."""
        if not _SHA256.fullmatch(sha256):
            raise MessageError(f"bundle sha256 {sha256[:80]!r} is not 64 lowercase hex digits")
        return f"{self.prefix}/bundles/{sha256}"

    def bundle_meta(self, sha256: str) -> str:
        """Retained, QoS 1: a `BundleMeta` JSON message."""
        return f"{self.bundle_prefix(sha256)}/meta"

    def bundle_chunk(self, sha256: str, index: int) -> str:
        """Retained, QoS 1: raw bytes `[index*chunk_size, (index+1)*chunk_size)` of the bundle."""
        if index < 0:
            raise MessageError(f"chunk index must be >= 0; found {index}")
        return f"{self.bundle_prefix(sha256)}/chunks/{index}"

    # Wildcard subscriptions for the controller and the monitor.
    def all_devices(self, leaf: Literal["status", "events", "telemetry", "desired"]) -> str:
        return f"{self.prefix}/devices/+/{leaf}"


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """Split `edgekit/v1/<fleet>/devices/<id>/<leaf>` into (fleet, device, leaf)."""
    parts = topic.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or parts[3] != "devices":
        raise MessageError(f"topic {topic[:200]!r} is not an edgekit device topic")
    return parts[2], parts[4], parts[5]


def _load(payload: bytes | str, *, schema: str) -> dict[str, Any]:
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise MessageError(f"{schema} message is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise MessageError(f"{schema} message must be a JSON object")
    found = document.get("schema")
    if found != schema:
        raise MessageError(f"expected schema {schema!r}; found {str(found)[:80]!r}")
    return document


def _require(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise MessageError(f"{document.get('schema')}: field {key!r} missing or of the wrong type")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _optional(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if document.get(key) is None:
        return None
    return _require(document, key, kind)


def _dump(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class ActiveBundle:
    """The bundle a device runs (or ran): name, semantic version and sha256 of the `.ekb`."""

    name: str
    version: str
    sha256: str

    @classmethod
    def from_json(cls, value: object) -> ActiveBundle | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise MessageError("bundle must be an object with name, version and sha256")
        return cls(
            name=_require(value, "name", str),
            version=_require(value, "version", str),
            sha256=_require(value, "sha256", str),
        )


@dataclass(frozen=True)
class Status:
    """`devices/<id>/status`: retained; the agent's last will publishes `online: false`."""

    fleet: str
    device: str
    online: bool
    state: str
    profile: str = ""
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    active: ActiveBundle | None = None
    previous: ActiveBundle | None = None
    rollout_id: str | None = None
    last_sequence: int = 0
    agent_version: str = ""
    ts: float = 0.0

    def to_json(self) -> bytes:
        document = asdict(self)
        document["tags"] = dict(self.tags)
        document["schema"] = STATUS_SCHEMA
        return _dump(document)

    @classmethod
    def from_json(cls, payload: bytes | str) -> Status:
        d = _load(payload, schema=STATUS_SCHEMA)
        tags = _optional(d, "tags", dict) or {}
        return cls(
            fleet=_require(d, "fleet", str),
            device=_require(d, "device", str),
            online=_require(d, "online", bool),
            state=_require(d, "state", str),
            profile=_optional(d, "profile", str) or "",
            group=_optional(d, "group", str) or "",
            tags={str(k): str(v) for k, v in tags.items()},
            active=ActiveBundle.from_json(d.get("active")),
            previous=ActiveBundle.from_json(d.get("previous")),
            rollout_id=_optional(d, "rollout_id", str),
            last_sequence=_optional(d, "last_sequence", int) or 0,
            agent_version=_optional(d, "agent_version", str) or "",
            ts=float(_optional(d, "ts", (int, float)) or 0.0),
        )


@dataclass(frozen=True)
class Event:
    """`devices/<id>/events`: one step of the update lifecycle, a refusal, a rollback."""

    fleet: str
    device: str
    kind: str
    state: str | None = None
    ok: bool | None = None
    reason: str | None = None
    bundle: ActiveBundle | None = None
    rollout_id: str | None = None
    sequence: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    ts: float = 0.0

    def to_json(self) -> bytes:
        document = asdict(self)
        document["details"] = dict(self.details)
        document["schema"] = EVENT_SCHEMA
        return _dump(document)

    @classmethod
    def from_json(cls, payload: bytes | str) -> Event:
        d = _load(payload, schema=EVENT_SCHEMA)
        return cls(
            fleet=_require(d, "fleet", str),
            device=_require(d, "device", str),
            kind=_require(d, "kind", str),
            state=_optional(d, "state", str),
            ok=_optional(d, "ok", bool),
            reason=_optional(d, "reason", str),
            bundle=ActiveBundle.from_json(d.get("bundle")),
            rollout_id=_optional(d, "rollout_id", str),
            sequence=_optional(d, "sequence", int),
            details=_optional(d, "details", dict) or {},
            ts=float(_optional(d, "ts", (int, float)) or 0.0),
        )


@dataclass(frozen=True)
class Telemetry:
    """`devices/<id>/telemetry`: one interval's counters, sent every `interval_s`.

    `seq` increases by one per message a device produces, so a consumer can count gaps;
    `dropped` is how many queued messages the device discarded (bounded on-disk queue) since
    it started. Latencies are milliseconds over the interval's requests.
    """

    fleet: str
    device: str
    seq: int
    interval_s: float
    requests: int
    errors: int
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # p50, p95, p99
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    temperature_c: float | None = None
    drift_psi: float | None = None
    bundle: ActiveBundle | None = None
    rollout_id: str | None = None
    state: str | None = None
    dropped: int = 0
    ts: float = 0.0

    def to_json(self) -> bytes:
        document = asdict(self)
        document["latency_ms"] = {k: float(v) for k, v in self.latency_ms.items()}
        document["cpu_percent"] = _finite(self.cpu_percent)
        document["temperature_c"] = _finite(self.temperature_c)
        document["drift_psi"] = _finite(self.drift_psi)
        document["schema"] = TELEMETRY_SCHEMA
        return _dump(document)

    @classmethod
    def from_json(cls, payload: bytes | str) -> Telemetry:
        d = _load(payload, schema=TELEMETRY_SCHEMA)
        latency = _optional(d, "latency_ms", dict) or {}
        return cls(
            fleet=_require(d, "fleet", str),
            device=_require(d, "device", str),
            seq=_require(d, "seq", int),
            interval_s=float(_require(d, "interval_s", (int, float))),
            requests=_require(d, "requests", int),
            errors=_require(d, "errors", int),
            latency_ms={str(k): float(v) for k, v in latency.items()},
            cpu_percent=_optional(d, "cpu_percent", (int, float)),
            rss_bytes=_optional(d, "rss_bytes", int),
            temperature_c=_optional(d, "temperature_c", (int, float)),
            drift_psi=_optional(d, "drift_psi", (int, float)),
            bundle=ActiveBundle.from_json(d.get("bundle")),
            rollout_id=_optional(d, "rollout_id", str),
            state=_optional(d, "state", str),
            dropped=_optional(d, "dropped", int) or 0,
            ts=float(_optional(d, "ts", (int, float)) or 0.0),
        )


@dataclass(frozen=True)
class BundleMeta:
    """`bundles/<sha>/meta`: how a bundle is split into retained chunks."""

    sha256: str
    size: int
    chunk_size: int
    chunks: int
    name: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise MessageError("bundle meta: sha256 must be 64 lowercase hex digits")
        if self.size < 1 or self.chunk_size < 1:
            raise MessageError("bundle meta: size and chunk_size must be positive")
        if self.chunks != -(-self.size // self.chunk_size):
            raise MessageError(
                f"bundle meta: {self.chunks} chunks cannot hold {self.size} bytes in chunks of "
                f"{self.chunk_size}"
            )

    def to_json(self) -> bytes:
        document = asdict(self)
        document["schema"] = BUNDLE_META_SCHEMA
        return _dump(document)

    @classmethod
    def from_json(cls, payload: bytes | str) -> BundleMeta:
        d = _load(payload, schema=BUNDLE_META_SCHEMA)
        return cls(
            sha256=_require(d, "sha256", str),
            size=_require(d, "size", int),
            chunk_size=_require(d, "chunk_size", int),
            chunks=_require(d, "chunks", int),
            name=_optional(d, "name", str) or "",
            version=_optional(d, "version", str) or "",
        )

    @classmethod
    def for_size(
        cls, sha256: str, size: int, *, chunk_size: int, name: str = "", version: str = ""
    ) -> BundleMeta:
        return cls(sha256, size, chunk_size, -(-size // chunk_size), name, version)
