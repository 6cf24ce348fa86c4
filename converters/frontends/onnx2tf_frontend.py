"""ONNX to a TensorFlow SavedModel with onnx2tf, for TFLite profiles.

onnx2tf pins tensorflow 2.19, onnxruntime 1.23 and numpy<2, so it cannot live beside edgekit's
own pins: it runs in a cached venv of its own (`ONNX2TF`, built like verify-runtime's runtime
venvs: atomic, locked, under `EDGEKIT_RUNTIME_CACHE`), as a subprocess (`_onnx2tf_worker.py`).
The ONNX model's dynamic dimensions are first fixed to the sample feed's shapes (batch 1, as a
device runs it) and the graph simplified, which is what onnx2tf converts reliably (it fails on
the shape arithmetic dynamic batch leaves behind, e.g. a PyTorch GRU's initial state).

The result is a SavedModel whose `serving_default` signature is keyed by the ONNX input and
output names, from which the TFLite candidates are built as for Keras input, and a `LayoutMap`
saying which inputs and outputs onnx2tf transposed (channels-first to channels-last): feeds,
reference outputs and golden samples must be moved into that layout (`converters.layout`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.layout import LayoutMap, TensorLayout
from edgekit.converters.passes.base import Pass, PassContext, PassResult

from edgekit.errors import ConversionError, first_line
from edgekit.verify_runtime import (
    ProgressCallback,
    RuntimeCache,
    RuntimeInstallError,
    ToolEnvironment,
    ToolSpec,
)

__all__ = [
    "ONNX2TF",
    "Onnx2TfConfig",
    "Onnx2TfPass",
    "Onnx2TfResult",
    "convert_onnx_to_saved_model",
    "fix_input_shapes",
    "onnx2tf_environment",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

# The last onnx2tf line for Python 3.11; it pins every dependency exactly (tensorflow 2.19.0,
# onnxruntime 1.23.0, onnx 1.19.1, numpy 1.26.4, ai-edge-litert 2.1.0, ...).
ONNX2TF = ToolSpec(
    name="onnx2tf",
    version="1.29.24",
    requirements=("onnx2tf==1.29.24",),
    import_check="onnx2tf, onnxruntime, tensorflow",
)
_WORKER = Path(__file__).resolve().parents[1] / "_onnx2tf_worker.py"
_WORKER_TIMEOUT_S = 1800.0
# Sample feeds the worker compares the two models on.
_SAMPLE_FEEDS = 4


@dataclass(frozen=True)
class Onnx2TfResult:
    """What onnx2tf made of an ONNX model."""

    saved_model: Path
    layout: LayoutMap  # source (ONNX) layout -> SavedModel/TFLite layout, per input and output
    max_relative_error: float  # SavedModel vs ONNX on the sample feeds, / max(1, |reference|)
    fixed_shapes: dict[str, tuple[int, ...]]  # the input shapes the model was converted with
    versions: dict[str, str]
    attempts: tuple[dict[str, Any], ...]
    notes: tuple[str, ...] = ()

    def details(self) -> dict[str, Any]:
        """JSON-ready form for the report (`source.onnx2tf`)."""
        return {
            "converter": f"onnx2tf {self.versions.get('onnx2tf', '?')} (tensorflow "
            f"{self.versions.get('tensorflow', '?')}, isolated venv)",
            "versions": self.versions,
            "fixed_shapes": {name: list(shape) for name, shape in self.fixed_shapes.items()},
            "max_relative_error": self.max_relative_error,
            "attempts": list(self.attempts),
            "layout": self.layout.to_dict(),
        }


def onnx2tf_environment(
    cache_dir: Path | None = None, *, progress: ProgressCallback | None = None
) -> ToolEnvironment:
    """The cached onnx2tf venv, built on first use (a few minutes: it installs TF 2.19)."""
    try:
        return RuntimeCache(cache_dir).ensure_tool(ONNX2TF, progress=progress)
    except RuntimeInstallError as e:
        raise ConversionError(
            f"converting ONNX for a TFLite profile needs onnx2tf in its own environment, which "
            f"cannot be installed here: {e}"
        ) from e


def fix_input_shapes(
    source: Path, destination: Path, shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Write `source` with every input's dimensions fixed to `shapes` and the graph simplified
    (onnxslim folds the shape arithmetic that fixed dimensions make constant). Returns notes."""
    import onnx
    from edgekit.converters.passes.onnx_passes import load_model, save_model

    model = load_model(source)
    notes = []
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        wanted = shapes[value.name]
        if len(dims) != len(wanted):
            raise ConversionError(
                f"input {value.name}: the sample data has rank {len(wanted)}, the model "
                f"{len(dims)}; give data shaped like the model's input"
            )
        before = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        for dim, size in zip(dims, wanted, strict=True):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ConversionError(
                    f"input {value.name}: the sample data has shape {list(wanted)}, the model "
                    f"{before}"
                )
            dim.Clear()
            dim.dim_value = int(size)
        if before != list(wanted):
            notes.append(f"input {value.name} fixed from {before} to {list(wanted)}")
    for value in model.graph.output:  # outputs follow from the inputs
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    try:
        import onnxslim

        slimmed = onnxslim.slim(model)
        if slimmed is not None:
            model = slimmed
    except Exception as e:  # noqa: BLE001  (onnxslim raises anything; the unslimmed model may do)
        notes.append(f"onnxslim failed ({first_line(e)}); converting the unsimplified graph")
    onnx.checker.check_model(model)
    save_model(model, destination)
    return notes


def convert_onnx_to_saved_model(
    source: Path,
    destination: Path,
    *,
    sample_feeds: Sequence[Mapping[str, Array]],
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> Onnx2TfResult:
    """Convert an ONNX file to a SavedModel with onnx2tf; raise `ConversionError` naming the
    operator onnx2tf cannot convert, or why the converted model does not match the ONNX one.

    `sample_feeds` are feeds of the ONNX model in its own layout (the validation data, batch 1):
    they fix the input shapes and are what the two models are compared on.
    """
    if not sample_feeds:
        raise ConversionError("onnx2tf needs at least one sample feed of the ONNX model")
    environment = onnx2tf_environment(cache_dir, progress=progress)
    feeds = [dict(feed) for feed in sample_feeds[:_SAMPLE_FEEDS]]
    shapes = {name: tuple(int(d) for d in np.shape(value)) for name, value in feeds[0].items()}
    with tempfile.TemporaryDirectory(prefix="edgekit-onnx2tf-") as scratch:
        workdir = Path(scratch)
        prepared = workdir / "fixed.onnx"
        notes = fix_input_shapes(source, prepared, shapes)
        feeds_path = workdir / "feeds.npz"
        arrays = {
            f"{i}/{name}": np.asarray(v) for i, feed in enumerate(feeds) for name, v in feed.items()
        }
        np.savez(feeds_path, count=np.array(len(feeds)), **arrays)  # type: ignore[arg-type]
        building = workdir / "saved_model"
        result = _run_worker(environment, prepared, building, feeds_path, workdir, progress)
        if result.get("stage") != "done":
            raise ConversionError(_refusal(source, result))
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(building, destination)
    layout = _layout(result, shapes)
    if layout.transposed:
        notes.append(f"onnx2tf changed layouts: {layout.describe()}")
    return Onnx2TfResult(
        saved_model=destination,
        layout=layout,
        max_relative_error=float(result.get("max_relative_error", 0.0)),
        fixed_shapes=shapes,
        versions={str(k): str(v) for k, v in result.get("versions", {}).items()},
        attempts=tuple(result.get("attempts", ())),
        notes=tuple(notes),
    )


def _run_worker(
    environment: ToolEnvironment,
    onnx_path: Path,
    saved_model: Path,
    feeds: Path,
    workdir: Path,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    from edgekit.verify_runtime import _clean_env

    worker = workdir / "worker.py"
    shutil.copyfile(_WORKER, worker)
    result_path = workdir / "result.json"
    request = {
        "onnx": str(onnx_path),
        "feeds": str(feeds),
        "saved_model": str(saved_model),
        "result": str(result_path),
    }
    request_path = workdir / "request.json"
    request_path.write_text(json.dumps(request))
    if progress is not None:
        progress(f"converting {onnx_path.name} with onnx2tf {ONNX2TF.version}")
    try:
        completed = subprocess.run(
            [str(environment.python), "-I", str(worker), str(request_path)],
            capture_output=True,
            text=True,
            timeout=_WORKER_TIMEOUT_S,
            env=_clean_env(),
            cwd=workdir,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConversionError(f"onnx2tf did not finish: {first_line(e)}") from e
    result: dict[str, Any] = {}
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    if result.get("stage") == "import_failed":
        raise ConversionError(
            f"the onnx2tf environment {environment.path} is broken ({result.get('error')}); "
            "delete that folder so that the next run installs it again"
        )
    if completed.returncode != 0 and result.get("stage") != "done":
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        result.setdefault("attempts", []).append(
            {"error": f"onnx2tf exited with status {completed.returncode}: {' | '.join(tail)}"}
        )
    return result


def _refusal(source: Path, result: Mapping[str, Any]) -> str:
    """One line: the operator onnx2tf cannot convert (or why the conversion does not match)."""
    attempts = list(result.get("attempts", ()))
    # The last attempt keeps every input's layout: its error is the model's, not onnx2tf's
    # transposition's.
    named = next((a for a in reversed(attempts) if a.get("op_type")), None)
    version = f"onnx2tf {ONNX2TF.version}"
    if named is not None:
        return (
            f"{source.name}: {version} cannot convert operator {named['op_type']} (node "
            f"{named['op_name']}): {named.get('error', 'no message')}; pick an onnx profile, or "
            "export the model from its training framework as a SavedModel/.keras file"
        )
    errors = "; ".join(str(a.get("error", "no message")) for a in attempts) or "no result"
    return (
        f"{source.name}: {version} could not convert the model ({errors}); pick an onnx profile, "
        "or export the model from its training framework as a SavedModel/.keras file"
    )


def _layout(result: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> LayoutMap:
    def item(entry: Mapping[str, Any]) -> TensorLayout:
        source_shape = tuple(int(d) for d in entry["source_shape"])
        permutation = tuple(int(axis) for axis in entry["permutation"])
        return TensorLayout(
            name=str(entry["name"]),
            source_shape=source_shape,
            artifact_shape=tuple(source_shape[axis] for axis in permutation),
            permutation=permutation,
        )

    return LayoutMap(
        inputs=tuple(item(entry) for entry in result["inputs"]),
        outputs=tuple(item(entry) for entry in result["outputs"]),
    )


@dataclass(frozen=True)
class Onnx2TfConfig:
    """Where the onnx2tf venv is cached (None: `EDGEKIT_RUNTIME_CACHE` or ~/.cache/edgekit)."""

    cache_dir: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Onnx2TfPass(Pass):
    """ONNX file in, SavedModel folder out (onnx2tf in its own venv); the layout changes are
    in `details["layout"]` (`LayoutMap.from_dict` reads them back).

    The sample feeds are the context's validation data (the ONNX model's own layout).
    """

    name = "onnx2tf"

    def __init__(self, config: Onnx2TfConfig | None = None) -> None:
        self.config = config or Onnx2TfConfig()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        if context.validation is None:
            raise ConversionError("onnx2tf needs sample feeds: the context has no validation data")
        result = convert_onnx_to_saved_model(
            source,
            destination,
            sample_feeds=list(context.validation.feeds[:_SAMPLE_FEEDS]),
            cache_dir=self.config.cache_dir,
            progress=context.progress,
        )
        return PassResult(notes=result.notes, details=result.details())
