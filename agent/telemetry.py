"""What the agent measures for its telemetry: request counts and latency percentiles, input
drift against the bundle's reference distribution, and the process's resource use.

- `RequestStats` counts requests and errors and keeps latencies in a fixed histogram of
  logarithmic buckets (5 % wide, 10 µs to ~50 min), so memory stays constant however many
  requests a device serves and a percentile is within one bucket (< 5 %) of the exact value.
- `DriftMonitor` bins recent input values into the reference deciles that the converter wrote
  to `reference_stats.json` and reports the Population Stability Index
  `PSI = sum((actual - expected) * ln(actual / expected))` over those bins. Rules of thumb:
  < 0.1 no shift, 0.1-0.25 moderate, > 0.25 a significant shift.
- `resource_usage()` reads /proc and /sys/class/thermal (no psutil on the device).

Stdlib and numpy only: this module runs on the device.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit.messages import BundleId, Telemetry

__all__ = [
    "DriftMonitor",
    "RequestStats",
    "ResourceSampler",
    "Resources",
    "StatsSnapshot",
    "build_telemetry",
    "psi",
    "read_rss_bytes",
    "read_temperature_c",
    "resource_usage",
]

log = logging.getLogger(__name__)

# Latency histogram: bucket i holds [MIN * GROWTH**i, MIN * GROWTH**(i+1)) seconds.
_MIN_LATENCY_S = 1e-5
_GROWTH = 1.05
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 400  # 1e-5 * 1.05**400 ~ 3e3 s; slower requests land in the last bucket
_QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))

# PSI treats an empty bin as this share, so a bin seen on one side only costs a finite amount.
_PSI_FLOOR = 1e-4


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters and latency percentiles (milliseconds) of the requests in one window.

    `requests` counts requests the model ran (successful or not); `errors` those whose
    runtime failed; `rejected` requests refused for bad input before reaching the model (the
    client's fault, so not part of the model's error ratio). Percentiles are None without
    requests.
    """

    requests: int = 0
    errors: int = 0
    rejected: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    window_s: float = 0.0

    @property
    def error_ratio(self) -> float:
        """errors / requests; 0.0 without requests."""
        return self.errors / self.requests if self.requests else 0.0

    def latency_ms(self) -> dict[str, float]:
        """The percentiles that are known, keyed as `Telemetry.latency_ms` expects."""
        found = {"p50": self.p50_ms, "p95": self.p95_ms, "p99": self.p99_ms}
        return {key: value for key, value in found.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rejected": self.rejected,
            "error_ratio": self.error_ratio,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "window_s": self.window_s,
        }


def _bucket(latency_s: float) -> int:
    if latency_s <= _MIN_LATENCY_S:
        return 0
    index = int(math.log(latency_s / _MIN_LATENCY_S) / _LOG_GROWTH)
    return index if index < _BUCKETS else _BUCKETS - 1


class RequestStats:
    """Thread-safe request, error and latency counters for one window (bounded memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * _BUCKETS
        self._requests = 0
        self._errors = 0
        self._rejected = 0
        self._min_s = math.inf
        self._max_s = 0.0
        self._since = time.monotonic()

    def record(self, latency_s: float, ok: bool) -> None:
        """Count one request the model ran, its latency in seconds and whether it succeeded."""
        index = _bucket(latency_s)
        with self._lock:
            self._counts[index] += 1
            self._requests += 1
            if not ok:
                self._errors += 1
            self._min_s = min(self._min_s, latency_s)
            self._max_s = max(self._max_s, latency_s)

    def reject(self) -> None:
        """Count one request refused for bad input (not the model's fault, no latency)."""
        with self._lock:
            self._rejected += 1

    def snapshot(self, reset: bool = True) -> StatsSnapshot:
        """Counters and percentiles since the last reset; `reset` starts a new window."""
        with self._lock:
            counts = list(self._counts)
            requests, errors, rejected = self._requests, self._errors, self._rejected
            low, high = self._min_s, self._max_s
            now = time.monotonic()
            window = now - self._since
            if reset:
                self._counts = [0] * _BUCKETS
                self._requests = self._errors = self._rejected = 0
                self._min_s, self._max_s = math.inf, 0.0
                self._since = now
        if not requests:
            return StatsSnapshot(rejected=rejected, window_s=window)
        quantiles = {key: _quantile(counts, requests, q, low, high) * 1e3 for key, q in _QUANTILES}
        return StatsSnapshot(
            requests=requests,
            errors=errors,
            rejected=rejected,
            p50_ms=quantiles["p50"],
            p95_ms=quantiles["p95"],
            p99_ms=quantiles["p99"],
            max_ms=high * 1e3,
            window_s=window,
        )


def _quantile(counts: list[int], total: int, q: float, low: float, high: float) -> float:
    """The q-quantile in seconds: the geometric middle of the bucket holding it, clamped to
    the smallest and largest latency seen (exact for a window of identical requests)."""
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            if index == _BUCKETS - 1:
                return high  # the open-ended last bucket: the slowest request seen
            middle = _MIN_LATENCY_S * math.exp(_LOG_GROWTH * (index + 0.5))
            return min(max(middle, low), high)
    return high


# --------------------------------------------------------------------------------------------
# Drift


def psi(expected: npt.NDArray[np.float64], actual: npt.NDArray[np.float64]) -> float:
    """Population Stability Index between two distributions over the same bins (shares)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), _PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), _PSI_FLOOR)
    e = e / e.sum()
    a = a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class _Reference:
    inner_edges: npt.NDArray[np.float64]  # bin edges without the outer two
    fractions: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]


class DriftMonitor:
    """PSI of recent inputs against the reference deciles of `reference_stats.json`.

    `observe` bins (a strided sample of at most `max_values_per_observe` values of) each input
    into the reference bins and adds to running counts; values beyond the reference range
    count in the outer bins and non-finite values are ignored. Memory is ten counters per
    input. Call `psi()` then `reset()` once per telemetry interval for per-interval drift;
    without resets, counts halve whenever an input's total passes `window_values`, so the
    score still follows recent inputs.
    """

    def __init__(
        self,
        reference_stats: Mapping[str, Any],
        *,
        max_values_per_observe: int = 256,
        window_values: int = 1_000_000,
    ) -> None:
        if max_values_per_observe < 1 or window_values < 1:
            raise ValueError("max_values_per_observe and window_values must be >= 1")
        self._max_values = max_values_per_observe
        self._window = window_values
        self._offset = 0
        self._lock = threading.Lock()
        self._inputs: dict[str, _Reference] = {}
        inputs = reference_stats.get("inputs")
        if not isinstance(inputs, Mapping):
            log.warning("reference stats hold no 'inputs' object; drift is not measured")
            return
        for name, entry in inputs.items():
            reference = _parse_reference(str(name), entry)
            if reference is not None:
                self._inputs[str(name)] = reference

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the inputs with a usable reference distribution."""
        return tuple(self._inputs)

    def observe(self, feeds: Mapping[str, Any]) -> None:
        """Add one request's inputs to the recent distribution."""
        for name, reference in self._inputs.items():
            value = feeds.get(name)
            if value is None:
                continue
            flat = np.asarray(value).reshape(-1)
            if flat.dtype.kind not in "biuf" or flat.size == 0:
                continue
            if flat.size > self._max_values:
                # A strided sample; the start rotates between calls so that a stride that
                # lines up with a layout (channels, padding) does not always pick the same.
                step = -(-flat.size // self._max_values)
                self._offset = (self._offset + 1) % step
                flat = flat[self._offset :: step]
            if flat.dtype.kind == "f":
                flat = flat[np.isfinite(flat)]
            bins = np.searchsorted(reference.inner_edges, flat, side="right")
            counts = np.bincount(bins, minlength=reference.fractions.size)
            with self._lock:
                reference.counts += counts
                if reference.counts.sum() > self._window:
                    # Without a reset, older inputs fade: halve the counts (keeps "recent").
                    reference.counts //= 2

    def observed(self) -> int:
        """How many values were binned since the last reset (over all inputs)."""
        with self._lock:
            return int(sum(int(reference.counts.sum()) for reference in self._inputs.values()))

    def psi_by_input(self) -> dict[str, float]:
        """PSI per input that saw values since the last reset."""
        with self._lock:
            counts = {name: reference.counts.copy() for name, reference in self._inputs.items()}
        result = {}
        for name, seen in counts.items():
            total = int(seen.sum())
            if total:
                result[name] = psi(self._inputs[name].fractions, seen / total)
        return result

    def psi(self) -> float | None:
        """The largest PSI over inputs (the worst shift), or None before any input was seen."""
        values = self.psi_by_input()
        return max(values.values()) if values else None

    def reset(self) -> None:
        """Start a new window of recent inputs."""
        with self._lock:
            for reference in self._inputs.values():
                reference.counts[:] = 0


def _parse_reference(name: str, entry: object) -> _Reference | None:
    if not isinstance(entry, Mapping):
        log.warning("reference stats for input %r are not an object; skipped", name)
        return None
    try:
        edges = np.asarray(entry["bin_edges"], dtype=np.float64)
        fractions = np.asarray(entry["bin_fractions"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        log.warning("reference stats for input %r are unreadable (%s); skipped", name, error)
        return None
    if edges.ndim != 1 or fractions.ndim != 1 or fractions.size < 2:
        # A constant input (one edge, one bin) cannot drift in a way deciles can show.
        log.info("reference stats for input %r have fewer than two bins; not monitored", name)
        return None
    if edges.size != fractions.size + 1 or not np.all(np.isfinite(edges)):
        log.warning("reference stats for input %r: bin_edges do not match bin_fractions", name)
        return None
    return _Reference(
        inner_edges=edges[1:-1].copy(),
        fractions=fractions,
        counts=np.zeros(fractions.size, dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class Resources:
    """The agent process's CPU use (percent of one core), resident memory and the SoC
    temperature; None where the system does not expose it."""

    cpu_percent: float | None
    rss_bytes: int | None
    temperature_c: float | None


class ResourceSampler:
    """Measures CPU use between successive `sample()` calls (the first call measures since
    the sampler was created); reads /proc and /sys/class/thermal under the given roots."""

    def __init__(
        self, *, proc: Path = Path("/proc"), thermal: Path = Path("/sys/class/thermal")
    ) -> None:
        self._proc = proc
        self._thermal = thermal
        self._lock = threading.Lock()
        self._last_cpu_s = _process_cpu_s()
        self._last_wall_s = time.monotonic()

    def sample(self) -> Resources:
        """CPU percent since the previous sample, current RSS and temperature."""
        cpu_s = _process_cpu_s()
        wall_s = time.monotonic()
        with self._lock:
            elapsed = wall_s - self._last_wall_s
            used = cpu_s - self._last_cpu_s
            self._last_cpu_s, self._last_wall_s = cpu_s, wall_s
        cpu_percent = 100.0 * used / elapsed if elapsed > 0 else None
        return Resources(
            cpu_percent=cpu_percent,
            rss_bytes=read_rss_bytes(self._proc / "self" / "status"),
            temperature_c=read_temperature_c(self._thermal),
        )


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


_default_sampler: ResourceSampler | None = None
_default_sampler_lock = threading.Lock()


def resource_usage() -> Resources:
    """This process's resources; CPU percent is measured since the previous call (or since
    the first call's module-level sampler was created)."""
    global _default_sampler  # noqa: PLW0603 - one process-wide CPU baseline
    with _default_sampler_lock:
        if _default_sampler is None:
            _default_sampler = ResourceSampler()
        sampler = _default_sampler
    return sampler.sample()


def read_rss_bytes(status: Path) -> int | None:
    """VmRSS of a /proc/<pid>/status file, in bytes."""
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024  # the kernel reports kB
            except (IndexError, ValueError):
                return None
    return None


# Thermal zone types that name the processor, best first (Raspberry Pi: cpu-thermal; x86:
# x86_pkg_temp; Jetson: CPU-therm; many SoCs: soc_thermal).
_CPU_ZONE_HINTS = ("cpu", "x86_pkg", "soc", "pkg")


def read_temperature_c(thermal: Path) -> float | None:
    """The processor's temperature from /sys/class/thermal, in °C (None if not readable)."""
    try:
        zones = sorted(thermal.glob("thermal_zone*"))
    except OSError:
        return None
    readings: list[tuple[int, float]] = []
    for zone in zones:
        try:
            raw = (zone / "temp").read_text().strip()
            kind = (zone / "type").read_text().strip().lower() if (zone / "type").exists() else ""
            millidegrees = int(raw)
        except (OSError, ValueError):
            continue
        rank = next(
            (i for i, hint in enumerate(_CPU_ZONE_HINTS) if hint in kind), len(_CPU_ZONE_HINTS)
        )
        readings.append((rank, millidegrees / 1000.0))
    if not readings:
        return None
    return min(readings, key=lambda reading: reading[0])[1]


# --------------------------------------------------------------------------------------------
# Message


def build_telemetry(
    *,
    fleet: str,
    device: str,
    seq: int,
    interval_s: float,
    snapshot: StatsSnapshot,
    resources: Resources | None = None,
    drift_psi: float | None = None,
    bundle: BundleId | None = None,
    rollout_id: str | None = None,
    state: str | None = None,
    dropped: int = 0,
    ts: float | None = None,
) -> Telemetry:
    """One interval's `Telemetry` message from the agent's measurements."""
    return Telemetry(
        fleet=fleet,
        device=device,
        seq=seq,
        interval_s=interval_s,
        requests=snapshot.requests,
        errors=snapshot.errors,
        latency_ms=snapshot.latency_ms(),
        cpu_percent=resources.cpu_percent if resources else None,
        rss_bytes=resources.rss_bytes if resources else None,
        temperature_c=resources.temperature_c if resources else None,
        drift_psi=drift_psi,
        bundle=bundle,
        rollout_id=rollout_id,
        state=state,
        dropped=dropped,
        ts=time.time() if ts is None else ts,
    )
