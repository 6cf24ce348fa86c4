"""What a conversion writes: the artifact, golden samples, reference statistics and the report.

Everything is staged in a temporary folder beside the output folder; `publish` moves the
finished files in with `os.replace`, so a failed run leaves nothing half-written and an earlier
conversion's outputs stay until the new ones are complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.benchmark import file_size
from edgekit.converters.candidates import CandidateReport
from edgekit.converters.data import Dataset
from edgekit.converters.layout import LayoutMap, golden_layout_entries
from edgekit.converters.passes.base import PassResult

from edgekit import __version__
from edgekit.errors import ConversionError
from edgekit.files import hash_file
from edgekit.profiles import Profile
from edgekit.runtimes import Runtime, TensorSpec, model_feed

__all__ = [
    "GOLDEN_SAMPLES",
    "REPORT_SCHEMA",
    "build_report",
    "check_output_dir",
    "copy_artifact",
    "publish",
    "reference_stats",
    "staging_parent",
    "write_golden",
    "write_reference",
]

Array = npt.NDArray[Any]
REPORT_SCHEMA = "edgekit.report/v1"
GOLDEN_SAMPLES = 8


def staging_parent(output_dir: Path) -> Path:
    parent = output_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder; pick another -o")


_OUTPUT_FILES = (
    "model.onnx",
    "model.onnx.data",
    "model.tflite",
    "golden.npz",
    "reference_stats.json",
    "report.json",
)


def publish(staging: Path, output_dir: Path) -> None:
    """Move the finished files into `output_dir`, replacing earlier outputs of ours."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUT_FILES:
        target = output_dir / name
        if not (staging / name).exists() and target.exists():
            target.unlink()  # a stale file from an earlier conversion (e.g. external data)
    for name in _OUTPUT_FILES:
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)
    kept = output_dir / "candidates"
    if kept.is_dir():
        shutil.rmtree(kept)
    if (staging / "candidates").is_dir():
        os.replace(staging / "candidates", kept)


def copy_artifact(source: Path, dest: Path) -> None:
    """Copy a candidate to `dest`; an ONNX model with external data is saved again so that
    its tensors live in `<dest name>.data` and the model names that file (copying the bytes
    would leave it pointing at the candidate's data file)."""
    if source.suffix != ".onnx":
        shutil.copyfile(source, dest)
        return
    import onnx
    from onnx.external_data_helper import uses_external_data

    header = onnx.load(str(source), load_external_data=False)
    if not any(uses_external_data(tensor) for tensor in header.graph.initializer):
        shutil.copyfile(source, dest)
        return
    try:
        model = onnx.load(str(source))  # with its external data, found beside it
        dest.with_name(dest.name + ".data").unlink(missing_ok=True)  # onnx refuses to overwrite
        # onnx looks for an existing data file relative to the working directory (which may
        # be the scratch folder holding the candidate's own `<name>.data`).
        with contextlib.chdir(dest.parent):
            onnx.save_model(
                model,
                str(dest),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=dest.name + ".data",
                size_threshold=0,
            )
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ConversionError(f"cannot write {dest} with its external data: {e}") from e


def write_golden(
    path: Path,
    runtime: Runtime,
    dataset: Dataset,
    profile: Profile,
    *,
    layout: LayoutMap | None = None,
) -> None:
    """Inputs and the chosen artifact's own outputs, for the agent's health check.

    Both in the artifact's own dtypes (int8/uint8 for a model with quantized I/O) and layout,
    keyed by its input and output names; each quantized tensor's [scale, zero_point] is stored
    as `quantization/inputs/<name>` or `quantization/outputs/<name>` (real = scale * (q - zp)).
    With a `layout` (onnx2tf transposed tensors), each transposed tensor's permutation from the
    source's layout is stored as `layout/inputs/<name>` or `layout/outputs/<name>`.
    """
    arrays: dict[str, Array] = golden_layout_entries(layout) if layout is not None else {}
    for index, real_feed in enumerate(dataset.feeds[:GOLDEN_SAMPLES]):
        feed = model_feed(runtime, real_feed)
        for name, value in feed.items():
            arrays[f"inputs/{index}/{name}"] = value
        for name, value in runtime.run(feed).items():
            arrays[f"outputs/{index}/{name}"] = value
    for side, specs in (("inputs", runtime.inputs), ("outputs", runtime.outputs)):
        for spec in specs:
            if spec.quantization is not None:
                scale, zero_point = spec.quantization
                arrays[f"quantization/{side}/{spec.name}"] = np.array(
                    [scale, zero_point], dtype=np.float64
                )
    arrays["tolerance"] = np.array(json.dumps(profile.health_check.to_dict()))
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


REFERENCE_SAMPLES = 32


def write_reference(
    path: Path,
    dataset: Dataset,
    reference: Mapping[str, Sequence[Array]],
    profile: Profile,
    *,
    kinds: Mapping[str, str],
) -> None:
    """Validation inputs with the *original* model's outputs and the profile's accuracy
    tolerance, beside the kept candidates: what `edgekit-agent bench` judges each candidate's
    outputs on the device against, by the converter's own rules (`inputs/<i>/<name>`,
    `outputs/<i>/<name>` as real values, `tolerance` = {"accuracy": ...})."""
    arrays: dict[str, Array] = {}
    count = min(REFERENCE_SAMPLES, len(dataset.feeds))
    for index in range(count):
        for name, value in dataset.feeds[index].items():
            arrays[f"inputs/{index}/{name}"] = np.asarray(value)
        for name, values in reference.items():
            arrays[f"outputs/{index}/{name}"] = np.asarray(values[index])
    accuracy = profile.to_dict()["accuracy"]
    accuracy["output_kinds"] = {**dict(kinds), **accuracy.get("output_kinds", {})}
    arrays["tolerance"] = np.array(json.dumps({"accuracy": accuracy}))
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def reference_stats(dataset: Dataset, inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Per input: decile bin edges and the share of values in each bin (for PSI drift)."""
    stats: dict[str, Any] = {"schema": "edgekit.reference_stats/v1", "inputs": {}}
    for spec in inputs:
        values = np.concatenate(
            [np.asarray(feed[spec.name], dtype=np.float64).ravel() for feed in dataset.feeds]
        )
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            continue
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, 11)))
        counts, _ = np.histogram(finite, bins=edges) if edges.size > 1 else (np.array([1]), None)
        stats["inputs"][spec.name] = {
            "dtype": spec.dtype,
            "bin_edges": [float(edge) for edge in edges],
            "bin_fractions": [float(c) for c in counts / max(1, counts.sum())],
            "mean": float(finite.mean()),
            "std": float(finite.std()),
            "samples": dataset.samples,
            "source": dataset.kind,
        }
    return stats


def _sha256(path: Path) -> str:
    if path.is_dir():  # a SavedModel: its graph and weights
        digest = hashlib.sha256()
        for part in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(part.relative_to(path).as_posix().encode() + b"\0")
            digest.update(hash_file(part)[1].encode())
        return digest.hexdigest()
    return hash_file(path)[1]


def _source_size(path: Path) -> int:
    if path.is_dir():
        return sum(part.stat().st_size for part in path.rglob("*") if part.is_file())
    return file_size(path)


def _host_engines(profile: Profile, artifact_runtime: Runtime) -> dict[str, str]:
    engines = {artifact_runtime.engine: artifact_runtime.version}
    if profile.target_format == "tflite":
        import tensorflow

        engines["tensorflow"] = str(tensorflow.__version__)
    return engines


def _fp32_comparison(
    candidates: Sequence[CandidateReport], winner: CandidateReport
) -> dict[str, Any]:
    fp32 = next((row for row in candidates if row.name == "fp32" and row.usable), None)
    if fp32 is None or not fp32.size_bytes or not winner.size_bytes:
        return {}
    summary: dict[str, Any] = {"size_ratio_vs_fp32": winner.size_bytes / fp32.size_bytes}
    if winner is fp32 or (winner.equal_to or winner.name) == (fp32.equal_to or fp32.name):
        summary["latency_vs_fp32"] = {
            "ratio": 1.0,
            "low": 1.0,
            "high": 1.0,
            "equal": "by construction",
        }
        summary["speedup_vs_fp32"] = 1.0
        return summary
    against = fp32.comparison if fp32.comparison.get("against") == winner.name else None
    if against:  # fp32 / winner: invert it
        ratio = {
            "ratio": 1.0 / against["ratio"] if against["ratio"] else None,
            "low": 1.0 / against["high"] if against.get("high") else None,
            "high": 1.0 / against["low"] if against.get("low") else None,
            "pairs": against["pairs"],
        }
        summary["latency_vs_fp32"] = ratio
        summary["speedup_vs_fp32"] = against["ratio"]
    return summary


def build_report(
    *,
    model: Path | str,
    profile: Profile,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    load_result: PassResult,
    route: Sequence[str] = (),
    layout: LayoutMap | None = None,
    optimize_result: PassResult,
    calibration_set: Dataset,
    validation_set: Dataset,
    data_notes: Sequence[str],
    source_row: CandidateReport,
    candidates: Sequence[CandidateReport],
    winner: CandidateReport,
    decision: dict[str, Any],
    warnings: Sequence[str],
    artifact: Path,
    artifact_runtime: Runtime,
    threads: int,
) -> dict[str, Any]:
    """The conversion report (`report.json`, schema `edgekit.report/v1`).

    `model` is the source's path, or a description of an in-memory source (an nn.Module);
    `route` the steps it took to what the candidates were built from; `layout` the tensors
    whose layout differs between the source and the artifact (the report's `layout`).
    """
    validated = validation_set.kind == "file"
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "edgekit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(model),
            "sha256": _sha256(model) if isinstance(model, Path) else None,
            "size_bytes": _source_size(model) if isinstance(model, Path) else None,
            **load_result.details,
            "route": [*route, f"{profile.target_format} candidates"],
            "signature": {
                "inputs": [spec.to_dict() for spec in inputs],
                "outputs": [spec.to_dict() for spec in outputs],
            },
            "notes": list(load_result.notes),
        },
        "profile": profile.name,
        "profile_source": profile.source,
        "runtime": {
            "format": profile.target_format,
            "oldest": {
                "package": profile.runtime.oldest.package,
                "version": profile.runtime.oldest.version,
            },
            "newest": {
                "package": profile.runtime.newest.package,
                "version": profile.runtime.newest.version,
            },
        },
        "host": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            **_host_engines(profile, artifact_runtime),
            "note": "latency and memory are measured on this host, not on the device",
        },
        # The artifact's own I/O (dtype, shape, quantization): the bundle manifest's signature.
        "signature": {
            "inputs": [spec.to_dict() for spec in artifact_runtime.inputs],
            "outputs": [spec.to_dict() for spec in artifact_runtime.outputs],
        },
        "data": {
            "calibration": calibration_set.describe(),
            "validation": validation_set.describe(),
            "accuracy": "validated" if validated else "unvalidated",
            "notes": list(data_notes),
        },
        "tolerance": profile.to_dict()["accuracy"],
        "optimize": optimize_result.details,
        "decision": decision,
        "warnings": list(warnings),
        "original": source_row.to_dict(),
        "candidates": [row.to_dict() for row in candidates],
        "chosen": winner.name,
        "summary": _fp32_comparison(candidates, winner),
        "artifact": {
            "path": artifact.name,
            "sha256": _sha256(artifact),
            "size_bytes": file_size(artifact),
            "compressed_size_bytes": winner.compressed_size_bytes,
            "inputs": [spec.to_dict() for spec in artifact_runtime.inputs],
            "outputs": [spec.to_dict() for spec in artifact_runtime.outputs],
            **winner.details.get("compat", {}),
            **(
                {"op_versions": winner.details["op_versions"]}
                if "op_versions" in winner.details
                else {}
            ),
        },
    }
    if layout is not None:
        # Feed the artifact in its own layout: artifact_value = transpose(source_value, perm).
        report["layout"] = {**layout.to_dict(), "changes": layout.describe()}
    return report
