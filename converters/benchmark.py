"""Measure candidates: paired, interleaved latency, peak memory, file and compressed size.

Latency is measured in a child process (`edgekit._bench_worker`) that loads every model and
times them in rounds; each round runs every model once in a shuffled order, so two models'
runs in the same round saw the same background load. On the workstation each run is timed by
its thread's CPU time on one thread: the work an inference does, which other processes taking
the CPU do not change (wall-clock at the profile's thread count is measured beside it, for the
report). The comparison of two models is the per-round log-ratio, summarized by its median and
a distribution-free confidence interval (`edgekit.stats.median_interval`).

Two candidates that are the same graph once the runtime folds constants at load time (weight-
only int8 and fp32: `Cast(int8) * scale` folds to a float weight) are equal by construction:
`folded_signature` says so, and they are not raced.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit._bench_worker import BenchWorkerError, run_worker
from edgekit.errors import ConversionError
from edgekit.quiet import disable_onnxruntime_telemetry
from edgekit.stats import median_interval

__all__ = [
    "LatencySamples",
    "Measurement",
    "RatioEstimate",
    "compressed_size",
    "file_size",
    "folded_signature",
    "measure",
    "measure_latency",
    "measure_memory",
    "paired_ratio",
]

log = logging.getLogger(__name__)

Feed = Mapping[str, npt.NDArray[Any]]
CONFIDENCE = 0.95


@dataclass
class LatencySamples:
    """One model's latency measurements, accumulated over one or more worker runs.

    `rounds` are single-run times (ms) keyed by (worker run, round index): two models' entries
    with the same key ran next to each other. p50/p95/p99 are wall-clock at the profile's
    thread count (for the report); the decision uses the rounds.
    """

    source: str  # where the numbers come from: "host", "device:<id>", ...
    rounds: dict[tuple[int, int], float] = field(default_factory=dict)
    clock: str = "wall"  # what the rounds measure: "cpu" (one thread's CPU time) or "wall"
    runs: int = 0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan

    def add(self, run: int, numbers: Mapping[str, Any]) -> None:
        """Merge one worker run's numbers for this model."""
        self.clock = str(numbers.get("clock", "wall"))
        for index, value in enumerate(numbers["rounds_ms"]):
            self.rounds[(run, index)] = float(value)
        total = self.runs + int(numbers["runs"])
        if self.runs == 0:
            self.p50_ms, self.p95_ms = float(numbers["p50_ms"]), float(numbers["p95_ms"])
            self.p99_ms = float(numbers.get("p99_ms", numbers["p95_ms"]))
        else:  # run-weighted blend: only used for display, decisions use the rounds
            weight = int(numbers["runs"]) / total
            self.p50_ms += weight * (float(numbers["p50_ms"]) - self.p50_ms)
            self.p95_ms += weight * (float(numbers["p95_ms"]) - self.p95_ms)
            self.p99_ms += weight * (float(numbers.get("p99_ms", numbers["p95_ms"])) - self.p99_ms)
        self.runs = total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "source": self.source,
            "p50_ms": round(self.p50_ms, 4),
            "p95_ms": round(self.p95_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "runs": self.runs,
            "rounds": len(self.rounds),
            "decision_clock": self.clock,
        }


@dataclass(frozen=True)
class RatioEstimate:
    """latency(a) / latency(b): median of paired round ratios and its confidence interval."""

    ratio: float
    low: float
    high: float
    pairs: int
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ratio": round(self.ratio, 4),
            "low": round(self.low, 4) if math.isfinite(self.low) else None,
            "high": round(self.high, 4) if math.isfinite(self.high) else None,
            "pairs": self.pairs,
            "confidence": self.confidence,
        }

    def __str__(self) -> str:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.ratio:.3f}x (too few paired rounds for an interval)"
        return (
            f"{self.ratio:.3f}x [{self.low:.3f}, {self.high:.3f}] "
            f"({self.confidence:.0%}, {self.pairs} paired rounds)"
        )


def paired_ratio(
    a: LatencySamples, b: LatencySamples, *, confidence: float = CONFIDENCE
) -> RatioEstimate:
    """latency(a) / latency(b) from the rounds both were measured in."""
    keys = sorted(set(a.rounds) & set(b.rounds))
    logs = [
        math.log(a.rounds[key] / b.rounds[key])
        for key in keys
        if a.rounds[key] > 0 and b.rounds[key] > 0
    ]
    if not logs:
        return RatioEstimate(math.nan, -math.inf, math.inf, 0, confidence)
    middle, low, high = median_interval(logs, confidence)
    return RatioEstimate(
        ratio=math.exp(middle),
        low=math.exp(low) if math.isfinite(low) else -math.inf,
        high=math.exp(high) if math.isfinite(high) else math.inf,
        pairs=len(logs),
        confidence=confidence,
    )


@dataclass(frozen=True)
class Measurement:
    """Peak memory and load time of one candidate (from a fresh process)."""

    peak_memory_bytes: int
    load_memory_bytes: int
    load_ms: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "peak_memory_bytes": self.peak_memory_bytes,
            "load_memory_bytes": self.load_memory_bytes,
            "load_ms": round(self.load_ms, 3),
        }


def model_files(path: Path) -> list[Path]:
    """The model file and its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def file_size(path: Path) -> int:
    """Bytes on disk of a model, external data included."""
    return sum(part.stat().st_size for part in model_files(path))


def compressed_size(path: Path, *, level: int = 10) -> int:
    """Bytes of the model after zstd (what a bundle costs over the air)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level)
    total = 0
    for part in model_files(path):
        with part.open("rb") as source:
            reader = compressor.stream_reader(source)
            while chunk := reader.read(1 << 20):
                total += len(chunk)
    return total


def _run_worker(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    try:
        return run_worker(spec, workdir=workdir)
    except BenchWorkerError as e:
        raise ConversionError(str(e)) from e


def _feed_file(feed: Feed, workdir: Path) -> Path:
    feed_path = workdir / "bench-feed.npz"
    np.savez(feed_path, **dict(feed))  # type: ignore[arg-type]
    return feed_path


def measure_latency(
    models: Mapping[str, Path],
    feed: Feed,
    *,
    threads: int,
    workdir: Path,
    seconds_per_model: float = 2.0,
    decision_clock: str = "cpu",
    run: int = 0,
    into: dict[str, LatencySamples] | None = None,
    source: str = "host",
) -> dict[str, LatencySamples]:
    """Time `models` side by side on one batch-1 feed; merge into `into` as worker run `run`."""
    samples = into if into is not None else {}
    if not models:
        return samples
    numbers = _run_worker(
        {
            "mode": "latency",
            "models": [{"name": name, "path": str(path)} for name, path in models.items()],
            "feed": str(_feed_file(feed, workdir)),
            "threads": threads,
            "decision_clock": decision_clock,
            "seconds_per_model": seconds_per_model,
            "seed": run,
        },
        workdir,
    )
    for name in models:
        samples.setdefault(name, LatencySamples(source=source)).add(run, numbers[name])
    return samples


def measure_memory(path: Path, feed: Feed, *, threads: int, workdir: Path) -> Measurement:
    """Peak resident memory a fresh process adds by loading and running `path`."""
    numbers = _run_worker(
        {
            "mode": "memory",
            "models": [{"name": path.stem, "path": str(path)}],
            "feed": str(_feed_file(feed, workdir)),
            "threads": threads,
        },
        workdir,
    )
    return Measurement(
        peak_memory_bytes=int(numbers["peak_bytes"]),
        load_memory_bytes=int(numbers["load_bytes"]),
        load_ms=float(numbers["load_ms"]),
    )


def measure(
    models: Mapping[str, Path],
    feed: Feed,
    *,
    threads: int,
    workdir: Path,
    seconds_per_model: float = 2.0,
) -> tuple[dict[str, LatencySamples], dict[str, Measurement]]:
    """Latency (side by side) and memory (one process each) of every model."""
    latency = measure_latency(
        models, feed, threads=threads, workdir=workdir, seconds_per_model=seconds_per_model
    )
    memory = {
        name: measure_memory(path, feed, threads=threads, workdir=workdir)
        for name, path in models.items()
    }
    return latency, memory


def folded_signature(path: Path) -> str | None:
    """A digest of the graph onnxruntime runs once it folds constants at load time.

    Op types, domains, attributes and tensor shapes/dtypes in topological order, with
    initializer *values* left out: two models with the same signature do the same work per
    inference. None for non-ONNX models or when onnxruntime cannot optimize the file.
    """
    if path.suffix != ".onnx":
        return None
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgekit-fold-") as folder:
        optimized = Path(folder) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        disable_onnxruntime_telemetry(ort)
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            model = onnx.load(str(optimized), load_external_data=False)
        except Exception as e:  # noqa: BLE001  (no signature is a valid answer)
            log.debug("no folded signature for %s: %s", path, e)
            return None
    opsets = {imp.domain or "": imp.version for imp in model.opset_import}
    return _structure_digest(model.graph, opsets)


def _default_attributes(op_type: str, domain: str, opset: int) -> dict[str, Any]:
    """An op's attributes that have default values, as protos (empty when unknown)."""
    import onnx

    try:
        schema = onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain)
    except onnx.defs.SchemaError:
        return {}
    return {
        name: attribute.default_value
        for name, attribute in schema.attributes.items()
        if attribute.default_value.type
    }


def _structure_digest(graph: Any, opsets: Mapping[str, int]) -> str:
    """A digest that ignores names and node order: each value is identified by how it is
    computed (Weisfeiler-Lehman style: a node's hash covers its op, its non-default attributes,
    its subgraphs and the hashes of its inputs), and the graph by the sorted node hashes and
    its outputs' hashes."""

    def digest_of(*parts: object) -> str:
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()

    values: dict[str, str] = {}
    for index, value in enumerate(graph.input):
        values[value.name] = digest_of("input", index)
    for init in graph.initializer:
        values[init.name] = digest_of("initializer", init.data_type, list(init.dims))
    node_hashes: list[str] = []
    for node in graph.node:  # topological order (the file's)
        attributes = []
        defaults = _default_attributes(node.op_type, node.domain, opsets.get(node.domain, 1))
        for attribute in sorted(node.attribute, key=lambda item: item.name):
            default = defaults.get(attribute.name)
            if default is not None and _same_attribute(attribute, default):
                continue
            if attribute.HasField("t"):
                tensor = attribute.t
                attributes.append(f"{attribute.name}=t{tensor.data_type}{list(tensor.dims)}")
            elif attribute.HasField("g"):
                attributes.append(f"{attribute.name}=g{_structure_digest(attribute.g, opsets)}")
            else:
                text = str(attribute).replace(f'name: "{attribute.name}"', "")
                attributes.append(f"{attribute.name}={' '.join(text.split())}")
        inputs = [
            values.get(name, digest_of("outer", name)) if name else "-" for name in node.input
        ]
        node_hash = digest_of(node.domain, node.op_type, attributes, inputs)
        node_hashes.append(node_hash)
        for index, name in enumerate(node.output):
            if name:
                values[name] = digest_of(node_hash, index)
    outputs = [values.get(value.name, digest_of("missing", value.name)) for value in graph.output]
    return digest_of(sorted(node_hashes), outputs)


def _same_attribute(attribute: Any, default: Any) -> bool:
    from onnx import helper

    try:
        return bool(helper.get_attribute_value(attribute) == helper.get_attribute_value(default))
    except Exception:  # noqa: BLE001  (unusual attribute types: keep them)
        return False
