"""Device measurements: what `edgekit-agent bench` writes and `edgekit convert --measurements`
reads (schema `edgekit.measurements/v1`).

It names the device (id, CPU architecture, CPU model and flags such as `asimddp`), the runtime
and its version, and per candidate: its sha256 (how the converter matches it to the candidate
it builds), load time, peak resident memory, latency percentiles with their intervals, the
per-round times (paired between candidates: round i of every candidate ran back to back), and
its fidelity on this device against the reference outputs the converter recorded.

The file comes from a device, so it is hostile input: `parse_measurements` checks size, JSON
depth, every type, finite ranges, string lengths and enumerations, and raises only
`MeasurementsError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgekit.errors import EdgekitError

__all__ = [
    "MEASUREMENTS_SCHEMA",
    "CandidateMeasurement",
    "DeviceInfo",
    "Measurements",
    "MeasurementsError",
    "parse_measurements",
]

MEASUREMENTS_SCHEMA = "edgekit.measurements/v1"
MAX_BYTES = 8 << 20
_MAX_DEPTH = 8
_MAX_CANDIDATES = 64
_MAX_ROUNDS = 10_000
_MAX_TEXT = 512
_MAX_FLAGS = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
_MAX_MS = 3.6e6  # an hour per inference: anything above is not a measurement
_QUANTILES = ("p50", "p95", "p99")


class MeasurementsError(EdgekitError):
    """A measurements document that does not follow `edgekit.measurements/v1`."""


@dataclass(frozen=True)
class DeviceInfo:
    """The device a bench ran on."""

    id: str
    machine: str  # e.g. aarch64
    cpu_model: str
    cpu_flags: tuple[str, ...] = ()
    cores: int = 1


@dataclass(frozen=True)
class CandidateMeasurement:
    """One candidate on the device."""

    name: str
    sha256: str
    error: str | None = None  # it did not load or run; nothing else is set
    load_ms: float | None = None
    peak_rss_bytes: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95%, per quantile
    rounds_ms: tuple[float, ...] = ()
    fidelity: dict[str, Any] | None = None  # accuracy summary against the reference outputs

    @property
    def measured(self) -> bool:
        """Loaded, ran and timed."""
        return self.error is None and bool(self.rounds_ms)


@dataclass(frozen=True)
class Measurements:
    """A bench run: the device, its runtime and every candidate."""

    device: DeviceInfo
    runtime: dict[str, str]  # package -> version
    threads: int
    created: str
    candidates: tuple[CandidateMeasurement, ...]
    schema: str = MEASUREMENTS_SCHEMA

    @property
    def source(self) -> str:
        """How reports name where these numbers come from: `device:<id>`."""
        return f"device:{self.device.id}"

    def by_sha256(self) -> dict[str, CandidateMeasurement]:
        """Candidates keyed by their file's sha256."""
        return {candidate.sha256: candidate for candidate in self.candidates}

    def to_json(self) -> str:
        """The document (`parse_measurements` reads it back)."""
        data = asdict(self)
        for candidate in data["candidates"]:
            # An interval too wide for the runs (p99 of 30 runs) has no finite bound: null.
            candidate["intervals"] = {
                key: [bound if math.isfinite(bound) else None for bound in bounds]
                for key, bounds in candidate["intervals"].items()
            }
        return json.dumps(data, indent=2, allow_nan=False) + "\n"


def parse_measurements(payload: bytes | str, *, where: str = "measurements") -> Measurements:
    """Read and check a measurements document; raises only `MeasurementsError`."""
    try:
        raw = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if len(raw) > MAX_BYTES:
            raise MeasurementsError(f"{where}: {len(raw)} bytes, more than {MAX_BYTES}")
        document = json.loads(raw, parse_constant=_refuse_constant)
        _check_depth(document, where)
        return _measurements(document, where)
    except MeasurementsError:
        raise
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise MeasurementsError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from e


def _refuse_constant(token: str) -> float:
    raise ValueError(f"{token} is not a JSON number")


def _check_depth(value: Any, where: str) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise MeasurementsError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise MeasurementsError(f"{where}: expected an object, found {type(value).__name__}")
    return value


def _text(value: Any, where: str, *, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise MeasurementsError(f"{where}: expected a string of at most {_MAX_TEXT} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise MeasurementsError(f"{where}: {value[:80]!r} is not a valid value")
    return value


def _number(value: Any, where: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MeasurementsError(f"{where}: expected a number, found {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise MeasurementsError(f"{where}: {number!r} is outside [{low}, {high}]")
    return number


def _integer(value: Any, where: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MeasurementsError(f"{where}: expected an integer in [{low}, {high}]")
    return value


def _list(value: Any, where: str, *, limit: int) -> Sequence[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise MeasurementsError(f"{where}: expected a list of at most {limit} items")
    return value


def _measurements(document: Any, where: str) -> Measurements:
    data = _mapping(document, where)
    if data.get("schema") != MEASUREMENTS_SCHEMA:
        raise MeasurementsError(
            f"{where}: schema {str(data.get('schema'))[:80]!r} is not {MEASUREMENTS_SCHEMA}; "
            "write it with `edgekit-agent bench`"
        )
    device = _mapping(data.get("device"), f"{where}: device")
    runtime = _mapping(data.get("runtime"), f"{where}: runtime")
    if not runtime or len(runtime) > 4:
        raise MeasurementsError(f"{where}: runtime: expected 1 to 4 package versions")
    candidates = _list(data.get("candidates"), f"{where}: candidates", limit=_MAX_CANDIDATES)
    parsed = tuple(
        _candidate(item, f"{where}: candidates[{index}]") for index, item in enumerate(candidates)
    )
    if len({candidate.sha256 for candidate in parsed}) != len(parsed):
        raise MeasurementsError(f"{where}: two candidates have the same sha256")
    return Measurements(
        device=DeviceInfo(
            id=_text(device.get("id"), f"{where}: device.id", pattern=_NAME),
            machine=_text(device.get("machine"), f"{where}: device.machine", pattern=_NAME),
            cpu_model=_text(device.get("cpu_model"), f"{where}: device.cpu_model"),
            cpu_flags=tuple(
                _text(flag, f"{where}: device.cpu_flags", pattern=_NAME)
                for flag in _list(
                    device.get("cpu_flags", []), f"{where}: device.cpu_flags", limit=_MAX_FLAGS
                )
            ),
            cores=_integer(device.get("cores", 1), f"{where}: device.cores", low=1, high=4096),
        ),
        runtime={
            _text(name, f"{where}: runtime", pattern=_NAME): _text(
                version, f"{where}: runtime.{name}", pattern=_NAME
            )
            for name, version in runtime.items()
        },
        threads=_integer(data.get("threads"), f"{where}: threads", low=1, high=4096),
        created=_text(data.get("created", ""), f"{where}: created"),
        candidates=parsed,
    )


def _candidate(value: Any, where: str) -> CandidateMeasurement:
    data = _mapping(value, where)
    name = _text(data.get("name"), f"{where}.name", pattern=_NAME)
    sha256 = _text(data.get("sha256"), f"{where}.sha256", pattern=_SHA256)
    if data.get("error") is not None:
        return CandidateMeasurement(name=name, sha256=sha256, error=_text(data["error"], where))
    latency = _mapping(data.get("latency_ms"), f"{where}.latency_ms")
    intervals = _mapping(data.get("intervals", {}), f"{where}.intervals")
    rounds = _list(data.get("rounds_ms"), f"{where}.rounds_ms", limit=_MAX_ROUNDS)
    if not rounds:
        raise MeasurementsError(f"{where}.rounds_ms: no rounds")
    fidelity = data.get("fidelity")
    return CandidateMeasurement(
        name=name,
        sha256=sha256,
        load_ms=_number(data.get("load_ms"), f"{where}.load_ms", low=0, high=_MAX_MS),
        peak_rss_bytes=_integer(
            data.get("peak_rss_bytes"), f"{where}.peak_rss_bytes", low=0, high=1 << 48
        ),
        latency_ms={
            key: _number(latency.get(key), f"{where}.latency_ms.{key}", low=0, high=_MAX_MS)
            for key in _QUANTILES
        },
        intervals={
            key: _interval(intervals[key], f"{where}.intervals.{key}")
            for key in _QUANTILES
            if key in intervals
        },
        rounds_ms=tuple(
            _number(item, f"{where}.rounds_ms", low=0, high=_MAX_MS) for item in rounds
        ),
        fidelity=_fidelity(fidelity, f"{where}.fidelity") if fidelity is not None else None,
    )


def _interval(value: Any, where: str) -> tuple[float, float]:
    items = _list(value, where, limit=2)
    if len(items) != 2:
        raise MeasurementsError(f"{where}: expected [low, high]")
    low = _number(items[0], where, low=0, high=math.inf) if items[0] is not None else 0.0
    high = _number(items[1], where, low=0, high=math.inf) if items[1] is not None else math.inf
    if low > high:
        raise MeasurementsError(f"{where}: low {low} above high {high}")
    return low, high


def _fidelity(value: Any, where: str) -> dict[str, Any]:
    data = _mapping(value, where)
    meets = data.get("meets_tolerance")
    if not isinstance(meets, bool):
        raise MeasurementsError(f"{where}.meets_tolerance: expected true or false")
    failures = [
        _text(item, f"{where}.failures")
        for item in _list(data.get("failures", []), f"{where}.failures", limit=64)
    ]
    samples = _integer(data.get("samples", 0), f"{where}.samples", low=0, high=1 << 20)
    outputs = _mapping(data.get("outputs", {}), f"{where}.outputs")
    if len(outputs) > 64:
        raise MeasurementsError(f"{where}.outputs: more than 64 outputs")
    checked: dict[str, Any] = {}
    for output, metrics in outputs.items():
        name = _text(output, f"{where}.outputs")
        entry = _mapping(metrics, f"{where}.outputs.{name}")
        checked[name] = {
            key: _number(entry[key], f"{where}.outputs.{name}.{key}", low=-1.0, high=1.0)
            for key in ("cosine", "top1_agreement")
            if entry.get(key) is not None
        }
    return {"meets_tolerance": meets, "failures": failures, "samples": samples, "outputs": checked}
