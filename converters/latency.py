"""Where the choice's latency comes from: this host, or the device's own measurements.

`HostLatency` measures the candidates here (paired, interleaved, one thread's CPU time: see
`edgekit.converters.benchmark`) and measures again while a comparison is inconclusive.
`DeviceLatency` reads what `edgekit-agent bench` measured on the device (`--measurements`),
matched by each candidate's sha256: wall-clock at the device's thread count, paired per round.
Both answer `compare(challenger, incumbent, may_measure_more)` for `edgekit.converters.choice`
and describe themselves for the report's `decision`.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy.typing as npt
from edgekit.converters.benchmark import (
    LatencySamples,
    Measurement,
    RatioEstimate,
    folded_signature,
    measure_latency,
    measure_memory,
    paired_ratio,
)
from edgekit.converters.candidates import CandidateReport, order_key
from edgekit.converters.choice import latency_class, verdict

from edgekit.files import hash_file
from edgekit.messages import Measurements
from edgekit.profiles import Profile

__all__ = ["DeviceLatency", "HostLatency", "same_architecture"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
# Extra paired measurement runs an inconclusive comparison may ask for, over the whole choice.
_EXTRA_LATENCY_RUNS = 4
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "x86-64": "x86_64",
                 "aarch64": "aarch64", "arm64": "aarch64"}  # fmt: skip


def same_architecture(profile: Profile) -> bool:
    """Whether this host's CPU architecture is the profile's."""
    host = _ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())
    return _ARCH_ALIASES.get(profile.arch.lower(), profile.arch.lower()) == host


class HostLatency:
    """Paired latency on this host, with equal-by-construction classes and extra runs for
    comparisons the first run leaves inconclusive."""

    def __init__(
        self,
        feed: Mapping[str, Array],
        *,
        threads: int,
        workdir: Path,
        seconds: float,
        profile: Profile,
    ) -> None:
        self._feed = feed
        self._threads = threads
        self._workdir = workdir
        self._seconds = seconds
        self._profile = profile
        self._paths: dict[str, Path] = {}
        self._samples: dict[str, LatencySamples] = {}
        self._runs = 0
        self._classes: list[list[str]] = []

    def measure(self, rows: Sequence[CandidateReport]) -> None:
        """Memory of every built row, latency of one row per equal-by-construction class."""
        measured = [row for row in rows if row.status == "ok" and row.path is not None]
        signatures: dict[str, CandidateReport] = {}
        for row in sorted(measured, key=lambda item: order_key(item.name)):
            assert row.path is not None
            row.measurement = measure_memory(
                row.path, self._feed, threads=self._threads, workdir=self._workdir
            )
            signature = folded_signature(row.path) if row.verdict != "reference" else None
            if signature is not None and signature in signatures:
                twin = signatures[signature]
                row.equal_to = latency_class(twin)
                row.notes.append(
                    f"same graph as {row.equal_to} once onnxruntime folds constants at load: "
                    "equal latency by construction, not raced"
                )
                continue
            if signature is not None:
                signatures[signature] = row
            self._paths[row.name] = row.path
        measure_latency(
            self._paths,
            self._feed,
            threads=self._threads,
            workdir=self._workdir,
            seconds_per_model=self._seconds,
            into=self._samples,
        )
        for row in measured:
            row.latency = self._samples[latency_class(row)]
        self._classes = [
            [row.name for row in measured if latency_class(row) == name] for name in self._paths
        ]

    def compare(
        self, challenger: CandidateReport, incumbent: CandidateReport, more: bool
    ) -> RatioEstimate:
        """latency(challenger) / latency(incumbent), measuring again while inconclusive."""
        a, b = latency_class(challenger), latency_class(incumbent)
        estimate = paired_ratio(self._samples[a], self._samples[b])
        margin = self._profile.quantization.min_speedup
        while more and self._runs < _EXTRA_LATENCY_RUNS:
            if verdict(estimate, margin) != "inconclusive":
                break
            self._runs += 1
            log.info("measuring %s and %s again (run %d): %s", a, b, self._runs, estimate)
            measure_latency(
                {a: self._paths[a], b: self._paths[b]},
                self._feed,
                threads=self._threads,
                workdir=self._workdir,
                seconds_per_model=self._seconds,
                run=self._runs,
                into=self._samples,
            )
            estimate = paired_ratio(self._samples[a], self._samples[b])
        return estimate

    def note(self) -> str:
        """What the winner's reason adds about the latency's source."""
        if same_architecture(self._profile):
            return ""
        return (
            f"; latency on the target ({self._profile.arch}) is unmeasured: this ranking used "
            f"{platform.machine()} host CPU time as a proxy (measure on the device with "
            "`edgekit-agent bench` and convert with --measurements)"
        )

    def decision(self) -> dict[str, Any]:
        """What was measured, for the report's `decision`."""
        host = platform.machine()
        target = self._profile.arch
        proxy = not same_architecture(self._profile)
        return {
            "latency_source": "host",
            "latency_clock": "one thread's CPU time per inference, paired per round",
            "target_latency": "unmeasured: host timings are a proxy" if proxy else "host",
            "host_arch": host,
            "target_arch": target,
            "latency_classes": [group for group in self._classes if group],
            "extra_measurement_runs": self._runs,
        }


class DeviceLatency:
    """The device's numbers (`edgekit-agent bench`) for the candidates whose bytes it measured;
    a candidate the device did not measure, or measured outside the tolerance, is not eligible."""

    def __init__(self, measurements: Measurements, *, profile: Profile) -> None:
        self._measurements = measurements
        self._profile = profile
        self._samples: dict[str, LatencySamples] = {}
        self._matched: dict[str, str] = {}

    @property
    def source(self) -> str:
        """`device:<id>`."""
        return self._measurements.source

    def apply(self, rows: Sequence[CandidateReport]) -> None:
        """Give each candidate the device's latency, memory and fidelity, or exclude it."""
        by_sha = self._measurements.by_sha256()
        for row in rows:
            if row.status != "ok" or row.path is None or row.verdict == "reference":
                continue
            sha256 = hash_file(row.path)[1]
            measured = by_sha.get(sha256)
            if measured is None:
                row.fail(
                    f"no measurement from {self.source} for these bytes (sha256 {sha256[:12]}); "
                    "bench the candidates this conversion keeps (--keep-candidates) on the device",
                    reason=f"not measured on {self.source}",
                )
                continue
            if not measured.measured:
                row.fail(f"does not run on {self.source}: {measured.error}")
                continue
            fidelity = measured.fidelity
            if fidelity is not None and not fidelity.meets_tolerance:
                row.fail(
                    f"misses the tolerance on {self.source}: " + "; ".join(fidelity.failures[:3]),
                    reason=f"misses the tolerance on {self.source}",
                )
                continue
            samples = LatencySamples(source=self.source, clock="wall")
            samples.add(
                0,
                {
                    "rounds_ms": list(measured.rounds_ms),
                    "p50_ms": measured.latency_ms["p50"],
                    "p95_ms": measured.latency_ms["p95"],
                    "p99_ms": measured.latency_ms["p99"],
                    "runs": len(measured.rounds_ms),
                    "clock": "wall",
                },
            )
            self._samples[row.name] = samples
            self._matched[row.name] = measured.name
            row.latency = samples
            row.equal_to = None  # on the device, every candidate is measured as it is
            row.measurement = Measurement(
                peak_memory_bytes=measured.peak_rss_bytes or 0,
                load_memory_bytes=0,
                load_ms=measured.load_ms or 0.0,
            )
            row.details["device"] = {
                "source": self.source,
                "bench_name": measured.name,
                "fidelity": msgspec.to_builtins(fidelity) if fidelity is not None else None,
            }

    def compare(
        self, challenger: CandidateReport, incumbent: CandidateReport, more: bool
    ) -> RatioEstimate:
        """latency(challenger) / latency(incumbent) from the device's paired rounds."""
        return paired_ratio(self._samples[challenger.name], self._samples[incumbent.name])

    def note(self) -> str:
        """What the winner's reason adds about the latency's source."""
        return f"; latency measured on {self.source}"

    def decision(self) -> dict[str, Any]:
        """What was measured, for the report's `decision`."""
        device = self._measurements.device
        return {
            "latency_source": self.source,
            "latency_clock": (
                f"wall-clock at {self._measurements.threads} threads, paired per round"
            ),
            "target_latency": self.source,
            "device": {
                "id": device.id,
                "machine": device.machine,
                "cpu_model": device.cpu_model,
                "cpu_flags": list(device.cpu_flags),
                "cores": device.cores,
                "runtime": dict(self._measurements.runtime),
            },
            "matched": dict(self._matched),
        }
