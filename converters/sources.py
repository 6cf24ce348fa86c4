"""Source models: read what the user gave and prepare what the candidates are built from.

An ONNX file is loaded, checked and canonicalized (`load`); a Keras file or SavedModel becomes
a SavedModel with one named serving signature (`tf_load`), exported to ONNX by tf2onnx for onnx
profiles. A PyTorch program (a `.pt2` file from `torch.export.save`, or an `nn.Module` given to
the Python API) is exported to ONNX with torch.onnx's dynamo exporter; its reference outputs
come from PyTorch itself. ONNX (given, or exported from PyTorch) for a TFLite profile becomes a
SavedModel through onnx2tf in its own venv (`to_saved_model`, once the data is known: onnx2tf
fixes the input shapes to the data's and checks its result on it), with the layout changes it
made (NCHW -> NHWC) recorded: the reference then runs in the artifact's layout.

The result names the file or folder candidates start from, a runtime for the source itself
(whose outputs are the reference every candidate is judged against), the source as the
benchmark can run it, and the route the model took (the report's `source.route`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.converters.layout import LayoutMap, TransposedRuntime
from edgekit.converters.passes.base import PassContext, PassResult, Step
from edgekit.converters.passes.tflite_passes import SourceKind, TensorFlowModel

from edgekit.errors import ConversionError
from edgekit.runtimes import OnnxRuntimeBackend, Runtime, RuntimeLoadError, TensorSpec

if TYPE_CHECKING:
    from edgekit.converters.data import Dataset
    from edgekit.converters.frontends.torch_frontend import TorchProgram

__all__ = [
    "LoadedSource",
    "datasets_to_artifact",
    "from_litert_torch",
    "load_source",
    "to_saved_model",
]


@dataclass(frozen=True)
class LoadedSource:
    """The source model, read and checked."""

    path: Path  # what the candidates are built from: loaded.onnx or a SavedModel folder
    original: Runtime  # runs the source model: the reference outputs (in the artifact's layout)
    runnable: Path | None  # the source as the benchmark worker can load it (None: not ORT)
    result: PassResult
    route: tuple[str, ...] = ()  # the steps from the source to what candidates are built from
    # ONNX for a TFLite profile: `to_saved_model` still has to run onnx2tf (it needs the data).
    needs_onnx2tf: bool = False
    layout: LayoutMap | None = None  # set once onnx2tf moved tensors to another layout
    # The source's own signature (before any layout change), for the report.
    source_inputs: tuple[TensorSpec, ...] = ()
    source_outputs: tuple[TensorSpec, ...] = ()
    torch_program: Any = None  # the PyTorch program (TorchProgram) of a PyTorch source
    # The candidates start from litert-torch's float32 .tflite (not a SavedModel).
    float_tflite: bool = False

    @property
    def signature(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The source's inputs and outputs, in its own layout."""
        if self.source_inputs:
            return self.source_inputs, self.source_outputs
        return self.original.inputs, self.original.outputs


def load_source(model: Path | TorchProgram, kind: SourceKind, context: PassContext) -> LoadedSource:
    """Read `model` (of `kind`; a `TorchProgram` for an nn.Module) into the scratch folder for
    the profile's target format."""
    workdir = context.workdir
    profile = context.profile
    if kind == "torch":
        return _load_torch(model, context)
    assert isinstance(model, Path)
    notes: list[str] = []
    details: dict[str, Any] = {}
    route: list[str] = []
    if kind != "onnx":
        saved_model = workdir / "source_saved_model"
        loaded_tf = Step.of("tf_load", kind=kind).build(profile).run(model, saved_model, context)
        if profile.target_format == "tflite":
            return LoadedSource(
                path=saved_model,
                original=TensorFlowModel(saved_model),
                runnable=None,
                result=loaded_tf,
                route=(f"{kind} -> SavedModel", "TFLiteConverter"),
            )
        # An onnx profile: export ONNX with tf2onnx, then the ONNX flow from there.
        exported = workdir / "exported.onnx"
        exported_result = Step.of("tf2onnx").build(profile).run(saved_model, exported, context)
        details = {"source_format": kind, **loaded_tf.details, "tf2onnx": exported_result.details}
        notes.append(f"exported to ONNX with {exported_result.details['converter']}")
        route = [f"{kind} -> SavedModel", str(exported_result.details["converter"])]
        model = exported
    loaded, original, load_result = _load_onnx(model, context)
    result = PassResult(
        notes=(*notes, *load_result.notes), details={**load_result.details, **details}
    )
    if profile.target_format == "tflite":
        return LoadedSource(
            path=loaded,
            original=original,
            runnable=None,
            result=result,
            route=("ONNX",),
            needs_onnx2tf=True,
        )
    return LoadedSource(
        path=loaded, original=original, runnable=loaded, result=result, route=(*route, "ONNX")
    )


def _load_onnx(model: Path, context: PassContext) -> tuple[Path, Runtime, PassResult]:
    loaded = context.workdir / "loaded.onnx"
    load_result = Step.of("load").build(context.profile).run(model, loaded, context)
    try:
        original = OnnxRuntimeBackend(loaded, threads=context.threads)
    except RuntimeLoadError as e:
        raise ConversionError(f"{model}: {e}") from e
    return loaded, original, load_result


def _load_torch(model: Path | TorchProgram, context: PassContext) -> LoadedSource:
    """A PyTorch program exported to ONNX (dynamo); PyTorch runs the reference."""
    from edgekit.converters.frontends.torch_frontend import TorchModel, export_onnx, load_pt2

    program = load_pt2(model) if isinstance(model, Path) else model
    reference = TorchModel(program)
    exported = export_onnx(program, context.workdir / "exported.onnx")
    loaded, _, load_result = _load_onnx(exported.path, context)
    details = {**load_result.details, **program.details(), "export": exported.to_dict()}
    notes = (f"exported to ONNX with {exported.exporter}", *exported.notes, *load_result.notes)
    return LoadedSource(
        path=loaded,
        original=reference,
        # The source row runs in PyTorch; the exported fp32 ONNX model is the fp32 candidate.
        runnable=None,
        result=PassResult(notes=notes, details=details),
        route=(program.source, exported.exporter),
        needs_onnx2tf=context.profile.target_format == "tflite",
        torch_program=program,
    )


def from_litert_torch(
    loaded: LoadedSource, context: PassContext, *, refused: ConversionError
) -> LoadedSource:
    """A PyTorch source for a TFLite profile that onnx2tf `refused`: litert-torch's float32
    TFLite model, from which the candidates are built (ai-edge-quantizer, tflite_prune). It
    keeps PyTorch's layout and its reference; raises with both routes' reasons if it fails."""
    from edgekit.converters.frontends.torch_frontend import export_litert

    program = loaded.torch_program
    if program is None or context.profile.target_format != "tflite":
        raise refused
    try:
        exported = export_litert(program, context.workdir / "litert_fp32.tflite")
    except ConversionError as e:
        raise ConversionError(f"{refused}; the other route, litert-torch: {e}") from e
    note = f"onnx2tf refused the exported ONNX model ({refused}); converted with litert-torch"
    return replace(
        loaded,
        path=exported.path,
        runnable=None,
        result=PassResult(
            notes=(*loaded.result.notes, note, *exported.notes),
            details={**loaded.result.details, "litert_torch": exported.to_dict()},
        ),
        route=(loaded.route[0], f"{exported.exporter} -> fp32 TFLite"),
        needs_onnx2tf=False,
        float_tflite=True,
    )


def to_saved_model(loaded: LoadedSource, context: PassContext, *, name: str) -> LoadedSource:
    """ONNX for a TFLite profile: the SavedModel onnx2tf makes of it (sample feeds: the
    context's validation data, in the source's layout), the reference presented in the
    artifact's layout. Raises `ConversionError` naming the operator onnx2tf cannot convert
    (`name`: the model as the user gave it, for that message)."""
    if not loaded.needs_onnx2tf:
        return loaded
    from edgekit.converters.frontends.onnx2tf_frontend import ONNX2TF

    saved_model = context.workdir / "onnx2tf_saved_model"
    try:
        result = Step.of("onnx2tf").build(context.profile).run(loaded.path, saved_model, context)
    except ConversionError as e:
        # Name what the user gave, not the scratch copy.
        raise ConversionError(f"{name}: {str(e).removeprefix('loaded.onnx: ')}") from e
    layout = LayoutMap.from_dict(result.details["layout"])
    original = loaded.original
    return replace(
        loaded,
        path=saved_model,
        original=TransposedRuntime(original, layout) if layout.transposed else original,
        runnable=None,
        result=PassResult(
            notes=(*loaded.result.notes, *result.notes),
            details={**loaded.result.details, "onnx2tf": result.details},
        ),
        route=(*loaded.route, f"onnx2tf {ONNX2TF.version} -> SavedModel", "TFLiteConverter"),
        needs_onnx2tf=False,
        layout=layout,
        source_inputs=original.inputs,
        source_outputs=original.outputs,
    )


def datasets_to_artifact(loaded: LoadedSource, *datasets: Dataset) -> tuple[Dataset, ...]:
    """Data given as for the source model, moved into the artifact's layout."""
    if loaded.layout is None:
        return datasets
    layout = loaded.layout
    return tuple(layout.dataset_to_artifact(dataset) for dataset in datasets)
