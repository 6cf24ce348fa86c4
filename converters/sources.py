"""Source models: read what the user gave and prepare what the candidates are built from.

An ONNX file is loaded, checked and canonicalized (`load`); a Keras file or SavedModel becomes
a SavedModel with one named serving signature (`tf_load`), exported to ONNX by tf2onnx for onnx
profiles. The result names the file or folder candidates start from, a runtime for the source
itself (whose outputs are the reference every candidate is judged against), and the source as
the benchmark can run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.converters.passes.base import PassContext, PassResult, Step
from edgekit.converters.passes.tflite_passes import SourceKind, TensorFlowModel

from edgekit.errors import ConversionError
from edgekit.runtimes import OnnxRuntimeBackend, Runtime, RuntimeLoadError

__all__ = ["LoadedSource", "load_source"]

ONNX_TO_TFLITE = (
    "{model}: profile {profile} needs TFLite, and no maintained ONNX-to-TFLite converter "
    "coexists with edgekit's pinned dependencies (onnx2tf pins tensorflow 2.19, onnxruntime "
    "1.23 and numpy<2); export the model from its training framework as a SavedModel folder "
    "or a .keras file and convert that, or pick an onnx profile (raspberrypi, x86-64, "
    "jetson-orin)"
)


@dataclass(frozen=True)
class LoadedSource:
    """The source model, read and checked."""

    path: Path  # what the candidates are built from: loaded.onnx or a SavedModel folder
    original: Runtime  # runs the source model: the reference outputs
    runnable: Path | None  # the source as the benchmark worker can load it (None: TF only)
    result: PassResult


def load_source(model: Path, kind: SourceKind, context: PassContext) -> LoadedSource:
    """Read `model` (of `kind`) into the scratch folder for the profile's target format."""
    workdir = context.workdir
    profile = context.profile
    if profile.target_format == "tflite" and kind == "onnx":
        raise ConversionError(ONNX_TO_TFLITE.format(model=model, profile=profile.name))
    notes: list[str] = []
    details: dict[str, Any] = {}
    if kind != "onnx":
        saved_model = workdir / "source_saved_model"
        loaded_tf = Step.of("tf_load", kind=kind).build(profile).run(model, saved_model, context)
        if profile.target_format == "tflite":
            return LoadedSource(
                path=saved_model,
                original=TensorFlowModel(saved_model),
                runnable=None,
                result=loaded_tf,
            )
        # An onnx profile: export ONNX with tf2onnx, then the ONNX flow from there.
        exported = workdir / "exported.onnx"
        exported_result = Step.of("tf2onnx").build(profile).run(saved_model, exported, context)
        details = {"source_format": kind, **loaded_tf.details, "tf2onnx": exported_result.details}
        notes.append(f"exported to ONNX with {exported_result.details['converter']}")
        model = exported
    loaded = workdir / "loaded.onnx"
    load_result = Step.of("load").build(profile).run(model, loaded, context)
    try:
        original = OnnxRuntimeBackend(loaded, threads=context.threads)
    except RuntimeLoadError as e:
        raise ConversionError(f"{model}: {e}") from e
    result = PassResult(
        notes=(*notes, *load_result.notes), details={**load_result.details, **details}
    )
    return LoadedSource(path=loaded, original=original, runnable=loaded, result=result)
