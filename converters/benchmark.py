"""Measure candidates on this host: latency (p50/p95), peak memory, file and compressed size.

Latency and memory are measured in child processes (`_bench_worker`): every candidate is loaded
in one process and timed round-robin, so background load hits all of them alike; memory is
measured in a fresh process per candidate.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit.errors import ConversionError

__all__ = ["Measurement", "compressed_size", "measure", "quick_latency_ms"]

log = logging.getLogger(__name__)

Feed = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Measurement:
    """One candidate's numbers on this host."""

    p50_ms: float
    p95_ms: float
    runs: int
    noise: float  # relative spread of the per-round medians (max - min) / median
    peak_memory_bytes: int
    load_memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "p50_ms": round(self.p50_ms, 4),
            "p95_ms": round(self.p95_ms, 4),
            "runs": self.runs,
            "noise": round(self.noise, 4),
            "peak_memory_bytes": self.peak_memory_bytes,
            "load_memory_bytes": self.load_memory_bytes,
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
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", dir=workdir, delete=False, encoding="utf-8"
    ) as handle:
        json.dump(spec, handle)
        spec_path = handle.name
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    completed = subprocess.run(
        [sys.executable, "-m", "edgekit.converters._bench_worker", spec_path],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise ConversionError(f"benchmark worker failed: {tail[0]}")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def measure(
    models: Mapping[str, Path],
    feed: Feed,
    *,
    threads: int,
    workdir: Path,
    seconds_per_model: float = 2.0,
    rounds: int = 5,
) -> dict[str, Measurement]:
    """Latency, noise and memory of every model on one batch-1 feed."""
    feed_path = workdir / "bench-feed.npz"
    np.savez(feed_path, **dict(feed))  # type: ignore[arg-type]
    latency = _run_worker(
        {
            "mode": "latency",
            "models": [{"name": name, "path": str(path)} for name, path in models.items()],
            "feed": str(feed_path),
            "threads": threads,
            "rounds": rounds,
            "seconds_per_model": seconds_per_model,
        },
        workdir,
    )
    results = {}
    for name, path in models.items():
        memory = _run_worker(
            {
                "mode": "memory",
                "models": [{"name": name, "path": str(path)}],
                "feed": str(feed_path),
                "threads": threads,
            },
            workdir,
        )
        numbers = latency[name]
        medians = numbers["round_medians_ms"]
        noise = (max(medians) - min(medians)) / max(float(np.median(medians)), 1e-9)
        results[name] = Measurement(
            p50_ms=numbers["p50_ms"],
            p95_ms=numbers["p95_ms"],
            runs=numbers["runs"],
            noise=noise,
            peak_memory_bytes=memory["peak_bytes"],
            load_memory_bytes=memory["load_bytes"],
        )
    return results


def quick_latency_ms(path: Path, feed: Feed, *, threads: int, runs: int = 30) -> float:
    """Median latency in this process; only for coarse choices such as which optimizer."""
    from edgekit.runtimes import OnnxRuntimeBackend

    session = OnnxRuntimeBackend(path, threads=threads)
    for _ in range(3):
        session.run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3
