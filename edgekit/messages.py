"""The message layer: one total parser per inbound MQTT message type.

Everything a device, a broker or another operator sends is hostile until parsed here. Each
JSON message type is a frozen `msgspec.Struct` whose field types carry the limits (string
lengths and patterns, finite numeric ranges, collection sizes); its one parser,
`<Type>.from_json(payload)`, checks the payload's size and nesting depth before decoding and
raises only `MessageError`, whose `reason` is one of `REJECT_REASONS` (a bounded label set for
the monitor's `edgekit_monitor_rejected_messages_total{reason}`). msgspec's decoder is strict
(no coercion: `true` is not an int, `"1"` not a float), never yields NaN or infinity (JSON has
no such tokens and out-of-range numbers are refused) and ignores unknown fields, so a newer
agent may add fields and a fleet can run mixed agent versions. Open enumerations (event
`kind`, updater `state`) are bounded tokens; consumers fold values they do not know into
`other`.

How the fleet controller reads the outcome of a directive (sequence S, bundle sha B), the
contract between `edgekit-agent`, `edgekit fleet simulate` and `edgekit fleet rollout`:
- success: the retained status reaches `state == "committed"` with `active.sha256 == B` and
  `last_sequence >= S`;
- failure: the retained status reaches `state == "rolled_back"` with `last_sequence >= S`, or
  an event with `kind` in {"rolled_back", "bundle_refused", "directive_refused"} carrying
  `sequence == S` (a refused directive is never accepted, so it cannot raise last_sequence).
In between, the agent publishes a `state` event and an updated status at every transition.

Adding a message type (e.g. `devices/<id>/bench/result`) is one schema and one registration:

    @message(schema="edgekit.bench-result/v1", max_bytes=16 * 1024)
    class BenchResult(_Message, frozen=True, tag_field="schema", tag="edgekit.bench-result/v1"):
        fleet: Id
        device: Id
        latency_ms: Annotated[float, Meta(ge=0, le=MAX_LATENCY_MS)]
        ...

`@message` builds the decoder and puts the type in `PARSERS`; `BenchResult.from_json` is then
its total parser and `to_json` its encoder, and the property tests in `tests/test_messages.py`
cover it without changes (they fuzz every entry of `PARSERS`). Add its topic to
`edgekit.topics.Topics` and its schema to `docs/asyncapi.yaml`. Payloads that are not JSON
structs (signed envelopes, bundle chunks) register a function with `register_parser`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args

import msgspec
from msgspec import Meta

from edgekit.errors import EdgekitError

__all__ = [
    "AGENT_STATES",
    "BUNDLE_META_SCHEMA",
    "EVENT_KINDS",
    "EVENT_SCHEMA",
    "MAX_DEPTH",
    "MEASUREMENTS_SCHEMA",
    "PARSERS",
    "REJECT_REASONS",
    "STATUS_SCHEMA",
    "TELEMETRY_SCHEMA",
    "BundleId",
    "BundleMeta",
    "CandidateMeasurement",
    "DeviceInfo",
    "Event",
    "Fidelity",
    "Measurements",
    "MessageError",
    "OutputFidelity",
    "Parser",
    "Status",
    "Telemetry",
    "message",
    "register_parser",
]

STATUS_SCHEMA = "edgekit.status/v1"
EVENT_SCHEMA = "edgekit.event/v1"
TELEMETRY_SCHEMA = "edgekit.telemetry/v1"
BUNDLE_META_SCHEMA = "edgekit.bundle-meta/v1"

MAX_DEPTH = 16
"""Deepest nesting of JSON arrays and objects any message may have (the schemas need 3)."""

REJECT_REASONS: tuple[str, ...] = (
    "too_large",  # over the type's byte limit
    "too_deep",  # nested deeper than MAX_DEPTH
    "not_json",  # not UTF-8 JSON (includes NaN/Infinity tokens)
    "schema",  # not an object, or the `schema` field is missing or another type's
    "invalid",  # a field is missing, of the wrong type, or out of its range
    "mismatch",  # well-formed, but about another device or fleet than its topic says
    "topic",  # the topic is not one this consumer reads
)
"""Why a message was rejected: the bounded label set consumers count by."""

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
    "trust_updated",  # a trust store rotation was applied; `details` has version and applied
    "trust_refused",  # a trust message or provisioned trust store was refused; `reason` says why
    "bench_refused",  # a bench request was refused; `reason` says why, `details.request_id`
    "bench_started",  # fetching and measuring; `details` has the request id and files
    "bench_done",  # measurements published on devices/<id>/bench/result (or `ok: false`)
)
"""Kinds of `devices/<id>/events` messages. Consumers must ignore kinds they do not know."""


class MessageError(EdgekitError, ValueError):
    """An MQTT payload or topic that does not follow the edgekit schemas.

    `reason` is one of `REJECT_REASONS`. (A `ValueError` too, so msgspec reports one raised
    in a schema's `__post_init__` as a validation error.)
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason if reason in REJECT_REASONS else "invalid"


# -- field types: every limit a message has is in its field types -----------------------------

# Ids in payloads are compared with the ids in their topic by every consumer (a `mismatch`
# otherwise), so a length bound is all they need here; regular expressions cost more than the
# rest of a parse.
Id = Annotated[str, Meta(min_length=1, max_length=128)]
Sha256 = Annotated[str, Meta(min_length=64, max_length=64)]
Label = Annotated[str, Meta(max_length=128)]  # names, versions, profiles, groups, rollout ids
Token = Annotated[str, Meta(min_length=1, max_length=32)]  # open enumerations (folded)
Reason = Annotated[str, Meta(max_length=2048)]
Count = Annotated[int, Meta(ge=0, le=2**53)]
PerInterval = Annotated[int, Meta(ge=0, le=2**40)]  # requests or errors in one interval
Timestamp = Annotated[float, Meta(ge=0, le=1e11)]  # Unix seconds (until year 5138)
Seconds = Annotated[float, Meta(ge=0, le=1e7)]
Milliseconds = Annotated[float, Meta(ge=0, le=1e9)]
Tags = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=128)]],
    Meta(max_length=32),
]
Details = Annotated[dict[Annotated[str, Meta(max_length=64)], Any], Meta(max_length=64)]
Latencies = Annotated[dict[Annotated[str, Meta(max_length=16)], Milliseconds], Meta(max_length=8)]


# -- parsing ------------------------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_depth(payload: bytes, *, limit: int = MAX_DEPTH) -> None:
    """Raise `MessageError` if JSON `payload` nests arrays/objects deeper than `limit`.

    Cheap on real traffic: only a payload holding more than `limit` brackets at all is scanned.
    """
    if payload.count(b"{") + payload.count(b"[") <= limit:
        return
    depth = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub(b"", payload)):
        if bracket in (b"{", b"["):
            depth += 1
            if depth > limit:
                raise MessageError(f"nested deeper than {limit} levels", reason="too_deep")
        else:
            depth -= 1


Parsed = TypeVar("Parsed")


@dataclass(frozen=True)
class Parser:
    """One inbound message type: its name, byte limit and total parse function."""

    name: str
    max_bytes: int
    parse: Callable[[bytes], object]


PARSERS: dict[str, Parser] = {}
"""Every registered inbound message type, by schema name (the property tests fuzz them all)."""


def register_parser(name: str, *, max_bytes: int, parse: Callable[[bytes], object]) -> None:
    """Register a total parser for a payload that is not a JSON struct (envelope, chunk)."""
    if name in PARSERS:
        raise ValueError(f"message type {name!r} is registered twice")
    PARSERS[name] = Parser(name, max_bytes, parse)


class _Message(msgspec.Struct, frozen=True, omit_defaults=False):
    """Base of the JSON messages: `from_json` (the total parser) and `to_json`."""

    _decoder: ClassVar[msgspec.json.Decoder[Any]]
    _max_bytes: ClassVar[int]
    _schema: ClassVar[str]

    @classmethod
    def from_json(cls: type[Parsed], payload: bytes | bytearray | memoryview | str) -> Parsed:
        """Parse `payload`; raises only `MessageError` (with a `reason`)."""
        return _decode(cls, payload)  # type: ignore[arg-type,return-value]

    def to_json(self) -> bytes:
        return _ENCODER.encode(self)


class _Required(msgspec.Struct, tag_field="schema", tag="\x00"):
    """Decoding into `Union[T, _Required]` makes msgspec require T's `schema` tag."""


_ENCODER = msgspec.json.Encoder()


def _decode(cls: type[_Message], payload: bytes | bytearray | memoryview | str) -> _Message:
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    schema = cls._schema
    if len(data) > cls._max_bytes:
        raise MessageError(
            f"{schema} message of {len(data)} bytes exceeds the {cls._max_bytes}-byte limit",
            reason="too_large",
        )
    try:
        check_depth(data)
        value = cls._decoder.decode(data)
    except MessageError as error:
        raise MessageError(f"{schema} message {error}", reason=error.reason) from None
    except msgspec.ValidationError as error:
        text = str(error)
        reason = "schema" if "schema`" in text or "Expected `object`" in text else "invalid"
        raise MessageError(f"{schema} message: {text[:300]}", reason=reason) from None
    except msgspec.DecodeError as error:
        raise MessageError(f"{schema} message is not JSON: {error}", reason="not_json") from None
    except RecursionError:  # deeper than the interpreter allows (check_depth caught less)
        raise MessageError(f"{schema} message nests too deeply", reason="too_deep") from None
    if not isinstance(value, cls):
        raise MessageError(f"expected schema {schema!r}", reason="schema")
    return value


MessageType = TypeVar("MessageType", bound=type[_Message])


def message(*, schema: str, max_bytes: int) -> Callable[[MessageType], MessageType]:
    """Class decorator: register a `_Message` subclass tagged with `schema` as a parser."""

    def register(cls: MessageType) -> MessageType:
        if cls.__struct_config__.tag != schema:
            raise ValueError(f"{cls.__name__} must be declared with tag={schema!r}")
        cls._schema = schema
        cls._max_bytes = max_bytes
        cls._decoder = msgspec.json.Decoder(Union[cls, _Required])  # noqa: UP007
        register_parser(schema, max_bytes=max_bytes, parse=cls.from_json)
        return cls

    return register


# -- the messages ---------------------------------------------------------------------------------


class BundleId(msgspec.Struct, frozen=True):
    """The bundle a device runs (or ran): name, semantic version and sha256 of the `.ekb`."""

    name: Label
    version: Label
    sha256: Sha256

    @classmethod
    def from_json(cls, value: object) -> BundleId | None:
        """From a decoded JSON value (a journal or state file); None stays None."""
        if value is None:
            return None
        try:
            return msgspec.convert(value, cls)
        except msgspec.ValidationError as error:
            raise MessageError(f"bundle: {error}") from None

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@message(schema=STATUS_SCHEMA, max_bytes=8 * 1024)
class Status(_Message, frozen=True, tag_field="schema", tag=STATUS_SCHEMA):
    """`devices/<id>/status`: retained; the agent's last will publishes `online: false`."""

    fleet: Id
    device: Id
    online: bool
    state: Token
    profile: Label = ""
    group: Label = ""
    tags: Tags = {}
    active: BundleId | None = None
    previous: BundleId | None = None
    rollout_id: Label | None = None
    last_sequence: Count = 0
    agent_version: Label = ""
    ts: Timestamp = 0.0


@message(schema=EVENT_SCHEMA, max_bytes=16 * 1024)
class Event(_Message, frozen=True, tag_field="schema", tag=EVENT_SCHEMA):
    """`devices/<id>/events`: one step of the update lifecycle, a refusal, a rollback."""

    fleet: Id
    device: Id
    kind: Token
    state: Token | None = None
    ok: bool | None = None
    reason: Reason | None = None
    bundle: BundleId | None = None
    rollout_id: Label | None = None
    sequence: Count | None = None
    details: Details = {}
    ts: Timestamp = 0.0


@message(schema=TELEMETRY_SCHEMA, max_bytes=8 * 1024)
class Telemetry(_Message, frozen=True, tag_field="schema", tag=TELEMETRY_SCHEMA):
    """`devices/<id>/telemetry`: one interval's counters, sent every `interval_s`.

    `seq` increases by one per message a device produces, so a consumer can count gaps;
    `dropped` is how many queued messages the device discarded (bounded on-disk queue) since
    it started. Latencies are milliseconds over the interval's requests (p50, p95, p99).
    """

    fleet: Id
    device: Id
    seq: Count
    interval_s: Seconds
    requests: PerInterval
    errors: PerInterval
    latency_ms: Latencies = {}
    cpu_percent: Annotated[float, Meta(ge=0, le=1e5)] | None = None
    rss_bytes: Count | None = None
    temperature_c: Annotated[float, Meta(ge=-300, le=1000)] | None = None
    drift_psi: Annotated[float, Meta(ge=0, le=1e9)] | None = None
    bundle: BundleId | None = None
    rollout_id: Label | None = None
    state: Token | None = None
    dropped: Count = 0
    ts: Timestamp = 0.0


@message(schema=BUNDLE_META_SCHEMA, max_bytes=4 * 1024)
class BundleMeta(_Message, frozen=True, tag_field="schema", tag=BUNDLE_META_SCHEMA):
    """`bundles/<sha>/meta`: how a bundle is split into retained chunks."""

    sha256: Sha256
    size_bytes: Annotated[int, Meta(ge=1, le=2**40)] = msgspec.field(name="size")
    chunk_size: Annotated[int, Meta(ge=1, le=2**32)] = msgspec.field()
    chunks: Annotated[int, Meta(ge=1, le=2**32)]
    name: Label = ""
    version: Label = ""

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise MessageError("bundle meta: sha256 must be 64 lowercase hex digits")
        if self.size_bytes < 1 or self.chunk_size < 1:
            raise MessageError("bundle meta: size and chunk_size must be positive")
        if self.chunks != -(-self.size_bytes // self.chunk_size):
            raise MessageError(
                f"bundle meta: {self.chunks} chunks cannot hold {self.size_bytes} bytes in "
                f"chunks of {self.chunk_size}"
            )

    @classmethod
    def for_size(
        cls, sha256: str, size_bytes: int, *, chunk_size: int, name: str = "", version: str = ""
    ) -> BundleMeta:
        return cls(sha256, size_bytes, chunk_size, -(-size_bytes // chunk_size), name, version)


# -- device measurements (`edgekit-agent bench`, `devices/<id>/bench/result`) ---------------------

MEASUREMENTS_SCHEMA = "edgekit.measurements/v1"
Bound = Annotated[float, Meta(ge=0, le=1e9)] | None  # an interval bound; null: unbounded


class OutputFidelity(msgspec.Struct, frozen=True):
    """One output of a candidate on the device against the reference outputs."""

    cosine: Annotated[float, Meta(ge=-1, le=1)] | None = None
    top1_agreement: Annotated[float, Meta(ge=0, le=1)] | None = None


class Fidelity(msgspec.Struct, frozen=True):
    """A candidate's outputs on the device, judged by the converter's accuracy rules."""

    meets_tolerance: bool
    failures: Annotated[list[Reason], Meta(max_length=64)] = []
    samples: Count = 0
    rule: Token = "point"
    outputs: Annotated[dict[Label, OutputFidelity], Meta(max_length=64)] = {}


class DeviceInfo(msgspec.Struct, frozen=True):
    """The device a bench ran on: id, CPU architecture (`machine`), CPU model, flags, cores."""

    id: Id
    machine: Label
    cpu_model: Annotated[str, Meta(max_length=256)]
    cpu_flags: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=512)] = []
    cores: Annotated[int, Meta(ge=1, le=4096)] = 1


class CandidateMeasurement(msgspec.Struct, frozen=True):
    """One candidate on the device; `error` set (and nothing else) when it did not run."""

    name: Label
    sha256: Sha256
    error: Reason | None = None
    load_ms: Milliseconds | None = None
    peak_rss_bytes: Count | None = None
    latency_ms: Latencies = {}  # p50, p95, p99: wall-clock at `threads`
    intervals: Annotated[
        dict[Annotated[str, Meta(max_length=8)], tuple[Bound, Bound]], Meta(max_length=8)
    ] = {}  # 95% distribution-free interval per percentile
    rounds_ms: Annotated[list[Milliseconds], Meta(max_length=10_000)] = []
    fidelity: Fidelity | None = None

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise MessageError("measurements: a candidate's sha256 must be 64 lowercase hex")
        if self.error is None and not self.rounds_ms:
            raise MessageError(f"measurements: candidate {self.name!r} has no rounds")

    @property
    def measured(self) -> bool:
        """Loaded, ran and timed."""
        return self.error is None and bool(self.rounds_ms)


@message(schema=MEASUREMENTS_SCHEMA, max_bytes=8 << 20)
class Measurements(_Message, frozen=True, tag_field="schema", tag=MEASUREMENTS_SCHEMA):
    """What `edgekit-agent bench` measured (a file, or `devices/<id>/bench/result`).

    Candidates are matched to what the converter builds by sha256; `rounds_ms` of different
    candidates are paired by index (round i of each ran back to back).
    """

    device: DeviceInfo
    runtime: Annotated[dict[Label, Label], Meta(min_length=1, max_length=4)]
    threads: Annotated[int, Meta(ge=1, le=4096)]
    candidates: Annotated[list[CandidateMeasurement], Meta(max_length=64)]
    created: Label = ""
    request_id: Label | None = None  # the bench request it answers (online loop)

    def __post_init__(self) -> None:
        if len({candidate.sha256 for candidate in self.candidates}) != len(self.candidates):
            raise MessageError("measurements: two candidates have the same sha256")

    @property
    def source(self) -> str:
        """How reports name where these numbers come from: `device:<id>`."""
        return f"device:{self.device.id}"

    def by_sha256(self) -> dict[str, CandidateMeasurement]:
        """Candidates keyed by their file's sha256."""
        return {candidate.sha256: candidate for candidate in self.candidates}
