"""`edgekit-agent bench`: measure candidate artifacts on this device, with this device's runtime.

What it takes (`collect_subjects`):

- model files (`.onnx`, `.tflite`), with a `reference.npz` beside them when one is there;
- the `candidates/` folder `edgekit convert --keep-candidates` writes (every model in it, its
  `reference.npz`: validation inputs, the original model's outputs and the profile's tolerance);
- a converter output folder (`model.onnx` + `golden.npz`) or a signed bundle (`.ekb`, verified
  against a trust store first), judged against their golden samples.

What it measures (`run_bench`), each in a child process at low priority so the device's served
model keeps the CPU first: load time and peak resident memory per candidate (a fresh process
each), then latency: every candidate loaded in one process and run in rounds (each round runs
every candidate once, in a shuffled order), wall-clock at the device's thread count; p50/p95/p99
with distribution-free 95% intervals; then each candidate's outputs on the reference inputs,
compared with the reference by the converter's own accuracy rules (`edgekit.accuracy`).

The result is an `edgekit.measurements/v1` document (`edgekit.messages.Measurements`) that names the
device (id, architecture, CPU model and flags) and the runtime versions, and matches candidates
by sha256: `edgekit convert --measurements FILE` chooses from it.

Agent extra only: no converter code, no onnx, no tensorflow.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit._bench_worker import BenchWorkerError, run_worker
from edgekit.accuracy import compare_outputs
from edgekit.errors import EdgekitError
from edgekit.files import hash_file
from edgekit.messages import (
    CandidateMeasurement,
    DeviceInfo,
    Fidelity,
    Measurements,
    OutputFidelity,
)
from edgekit.profiles import AccuracyTolerance
from edgekit.stats import quantile_interval

__all__ = ["BenchError", "BenchSubject", "collect_subjects", "device_info", "run_bench"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Progress = Callable[[str], None]
REFERENCE_FILE = "reference.npz"
_MODEL_SUFFIXES = (".onnx", ".tflite")
_NICE = 10


class BenchError(EdgekitError):
    """Nothing to bench, or a candidate path the bench cannot use."""


@dataclass(frozen=True)
class BenchSubject:
    """One model to measure, and what its outputs are judged against (None: not judged)."""

    name: str
    model: Path
    sha256: str
    reference: Path | None


def collect_subjects(
    paths: Sequence[Path],
    *,
    workdir: Path,
    trust: Any = None,
) -> list[BenchSubject]:
    """The models named by `paths` (see the module docstring); raises `BenchError`."""
    subjects: list[BenchSubject] = []
    for path in paths:
        if not path.exists():
            raise BenchError(f"{path} does not exist; give model files, a candidates/ folder "
                             "or a bundle")  # fmt: skip
        if path.is_dir():
            models = sorted(p for p in path.iterdir() if p.suffix in _MODEL_SUFFIXES)
            if not models:
                raise BenchError(
                    f"{path} holds no .onnx or .tflite model; give the candidates/ folder that "
                    "`edgekit convert --keep-candidates` writes"
                )
            subjects.extend(_subject(model) for model in models)
        elif path.suffix == ".ekb":
            subjects.append(_bundle_subject(path, workdir=workdir, trust=trust))
        elif path.suffix in _MODEL_SUFFIXES:
            subjects.append(_subject(path))
        else:
            raise BenchError(
                f"{path}: expected a .onnx or .tflite model, a folder of them, or an .ekb bundle"
            )
    names = [subject.name for subject in subjects]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchError(f"two candidates are called {duplicates[0]!r}; rename one of the files")
    return subjects


def _subject(model: Path) -> BenchSubject:
    reference = model.with_name(REFERENCE_FILE)
    golden = model.with_name("golden.npz")
    chosen = reference if reference.is_file() else golden if golden.is_file() else None
    return BenchSubject(name=model.stem, model=model, sha256=hash_file(model)[1], reference=chosen)


def _bundle_subject(bundle: Path, *, workdir: Path, trust: Any) -> BenchSubject:
    if trust is None:
        raise BenchError(
            f"{bundle}: a bundle is verified before it runs; give --trust TRUSTSTORE (or "
            "--config for the agent's own trust store)"
        )
    from edgekit.bundle import extract_bundle

    folder = workdir / f"bundle-{bundle.stem}"
    try:
        with open(bundle, "rb") as handle:
            installed = extract_bundle(handle, folder, trust=trust)
    except OSError as e:
        raise BenchError(f"cannot read {bundle}: {e}") from e
    models = [p for p in folder.iterdir() if p.suffix in _MODEL_SUFFIXES]
    if len(models) != 1:
        raise BenchError(f"{bundle}: expected one model in the bundle, found {len(models)}")
    subject = _subject(models[0])
    name = getattr(getattr(installed, "manifest", None), "name", None) or bundle.stem
    return BenchSubject(
        name=str(name), model=subject.model, sha256=subject.sha256, reference=subject.reference
    )


def device_info(device_id: str) -> DeviceInfo:
    """This machine as the measurements name it (from /proc/cpuinfo where there is one)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = (
        fields.get("model name")
        or fields.get("hardware")
        or (f"ARM CPU part {fields['cpu part']}" if "cpu part" in fields else "unknown")
    )
    flags = tuple(sorted(set((fields.get("flags") or fields.get("features") or "").split())))
    return DeviceInfo(
        id=device_id,
        machine=platform.machine() or "unknown",
        cpu_model=model[:200],
        cpu_flags=[flag[:64] for flag in flags[:512]],
        cores=min(os.cpu_count() or 1, 4096),
    )


def _runtime_versions(subjects: Sequence[BenchSubject]) -> dict[str, str]:
    found: dict[str, str] = {}
    packages = set()
    for subject in subjects:
        if subject.model.suffix == ".onnx":
            packages.add("onnxruntime")
        else:
            packages.update(("ai-edge-litert", "tflite-runtime", "tensorflow"))
    for package in sorted(packages):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    if not found:
        raise BenchError("no runtime for these candidates is installed: pip install "
                         "'edgekit[agent]' (onnxruntime) or ai-edge-litert")  # fmt: skip
    return found


def run_bench(
    subjects: Sequence[BenchSubject],
    *,
    device_id: str,
    threads: int,
    seconds_per_model: float = 2.0,
    throttle: Mapping[str, float] | None = None,
    workdir: Path,
    progress: Progress | None = None,
    nice: int = _NICE,
) -> Measurements:
    """Measure every subject on this device (see the module docstring)."""
    if not subjects:
        raise BenchError("nothing to bench: give at least one candidate")
    say = progress or (lambda _message: None)
    versions = _runtime_versions(subjects)
    feed_path = workdir / "bench-feed.npz"
    _write_feed(subjects, feed_path)
    results: dict[str, dict[str, Any]] = {}
    runnable: list[BenchSubject] = []
    for subject in subjects:
        say(f"loading {subject.name}")
        try:
            memory = run_worker(
                {
                    "mode": "memory",
                    "models": [{"name": subject.name, "path": str(subject.model)}],
                    "feed": str(feed_path),
                    "threads": threads,
                    "nice": nice,
                },
                workdir=workdir,
            )
        except BenchWorkerError as e:
            results[subject.name] = {"error": str(e)}
            continue
        results[subject.name] = {
            "load_ms": float(memory["load_ms"]),
            "peak_rss_bytes": int(memory["peak_bytes"]),
        }
        runnable.append(subject)
    if runnable:
        say(f"timing {len(runnable)} candidate(s), {seconds_per_model:g} s each")
        latency = run_worker(
            {
                "mode": "latency",
                "models": [{"name": s.name, "path": str(s.model)} for s in runnable],
                "feed": str(feed_path),
                "threads": threads,
                "decision_clock": "wall",
                "seconds_per_model": seconds_per_model,
                "min_rounds": 30,
                "throttle": dict(throttle or {}),
                "nice": nice,
            },
            workdir=workdir,
        )
        for subject in runnable:
            rounds = [float(value) for value in latency[subject.name]["rounds_ms"]]
            entry = results[subject.name]
            entry["rounds_ms"] = rounds
            entry["latency_ms"], entry["intervals"] = _percentiles(rounds)
            if subject.reference is not None:
                say(f"checking {subject.name} against its reference outputs")
                entry["fidelity"] = _fidelity(subject, threads=threads, workdir=workdir, nice=nice)
    candidates = [
        CandidateMeasurement(
            name=subject.name,
            sha256=subject.sha256,
            error=results[subject.name].get("error"),
            load_ms=results[subject.name].get("load_ms"),
            peak_rss_bytes=results[subject.name].get("peak_rss_bytes"),
            latency_ms=results[subject.name].get("latency_ms", {}),
            intervals=results[subject.name].get("intervals", {}),
            rounds_ms=list(results[subject.name].get("rounds_ms", ())),
            fidelity=results[subject.name].get("fidelity"),
        )
        for subject in subjects
    ]
    return Measurements(
        device=device_info(device_id),
        runtime=versions,
        threads=threads,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        candidates=candidates,
    )


def _percentiles(
    rounds: Sequence[float],
) -> tuple[dict[str, float], dict[str, tuple[float | None, float | None]]]:
    """p50/p95/p99 and their 95% intervals; an unbounded side (too few runs) is None."""
    values: dict[str, float] = {}
    intervals: dict[str, tuple[float | None, float | None]] = {}
    for key, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        estimate, low, high = quantile_interval(rounds, q, 0.95)
        values[key] = estimate
        intervals[key] = (
            max(low, 0.0) if math.isfinite(low) else None,
            high if math.isfinite(high) else None,
        )
    return values, intervals


def _read_npz(path: Path) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as e:
        raise BenchError(f"{path}: not a readable reference (.npz): {e}") from e


def _feeds(arrays: Mapping[str, Array], side: str) -> dict[int, dict[str, Array]]:
    feeds: dict[int, dict[str, Array]] = {}
    for key, value in arrays.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == side and parts[1].isdecimal():
            feeds.setdefault(int(parts[1]), {})[parts[2]] = value
    return feeds


def _write_feed(subjects: Sequence[BenchSubject], path: Path) -> None:
    """One batch-1 feed for the timing: the first reference sample of any subject."""
    for subject in subjects:
        if subject.reference is None:
            continue
        feeds = _feeds(_read_npz(subject.reference), "inputs")
        if feeds:
            np.savez(path, **feeds[min(feeds)])  # type: ignore[arg-type]
            return
    raise BenchError(
        "no reference inputs to time the candidates with: bench the candidates/ folder of "
        "`edgekit convert --keep-candidates` (it holds reference.npz), a converter output "
        "folder or a bundle (golden.npz)"
    )


def _fidelity(subject: BenchSubject, *, threads: int, workdir: Path, nice: int) -> Fidelity:
    assert subject.reference is not None
    arrays = _read_npz(subject.reference)
    out = workdir / f"{subject.name}-outputs.npz"
    try:
        run_worker(
            {
                "mode": "outputs",
                "models": [{"name": subject.name, "path": str(subject.model)}],
                "inputs": str(subject.reference),
                "out": str(out),
                "threads": threads,
                "nice": nice,
            },
            workdir=workdir,
        )
    except BenchWorkerError as e:
        return Fidelity(meets_tolerance=False, failures=[str(e)[:2048]])
    found = _feeds(_read_npz(out), "outputs")
    expected = _feeds(arrays, "outputs")
    quantization = {
        key.split("/", 2)[2]: (float(value[0]), int(value[1]))
        for key, value in arrays.items()
        if key.startswith("quantization/outputs/")
    }
    indices = sorted(set(expected) & set(found))
    reference = {
        name: [_real(expected[i][name], quantization.get(name)) for i in indices]
        for name in expected[indices[0]]
    } if indices else {}  # fmt: skip
    candidate = {name: [found[i][name] for i in indices] for name in reference}
    tolerance, kinds, rule = _tolerance(arrays)
    result = compare_outputs(reference, candidate, tolerance, kinds=kinds, rule=rule)
    return Fidelity(
        meets_tolerance=result.meets_tolerance,
        failures=[failure[:2048] for failure in result.failures[:64]],
        samples=len(indices),
        rule=rule,
        outputs={
            metric.name[:128]: OutputFidelity(
                cosine=min(1.0, max(-1.0, metric.cosine)), top1_agreement=metric.top1_agreement
            )
            for metric in result.outputs
        },
    )


def _real(values: Array, quantization: tuple[float, int] | None) -> Array:
    from edgekit.runtimes import dequantize

    return dequantize(values, quantization)


def _tolerance(arrays: Mapping[str, Array]) -> tuple[AccuracyTolerance, dict[str, Any], Any]:
    """The tolerance a reference file records: the profile's accuracy (reference.npz, judged
    like the converter judges) or the health check's (golden.npz, plain values)."""
    try:
        document = json.loads(str(arrays["tolerance"])) if "tolerance" in arrays else {}
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    accuracy = document.get("accuracy")
    if isinstance(accuracy, dict):
        kinds = accuracy.get("output_kinds") or {}
        return (
            AccuracyTolerance(
                min_top1_agreement=float(accuracy.get("min_top1_agreement", 0.99)),
                min_cosine=float(accuracy.get("min_cosine", 0.99)),
                min_iou=float(accuracy.get("min_iou", 0.9)),
                confidence=float(accuracy.get("confidence", 0.95)),
            ),
            dict(kinds) if isinstance(kinds, dict) else {},
            "statistical",
        )
    return (
        AccuracyTolerance(
            min_top1_agreement=float(document.get("min_top1_agreement", 0.95)),
            min_cosine=float(document.get("min_cosine", 0.98)),
        ),
        {},
        "point",
    )


def default_workdir() -> tempfile.TemporaryDirectory[str]:
    """A scratch folder for one bench."""
    return tempfile.TemporaryDirectory(prefix="edgekit-bench-")
