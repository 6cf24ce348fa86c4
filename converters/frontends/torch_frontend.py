"""PyTorch in: a `torch.export` program (`.pt2` from `torch.export.save`) or an `nn.Module` with
example inputs, to ONNX (torch.onnx's dynamo exporter) or to TFLite (litert-torch).

`load_pt2` and `export_module` give a `TorchProgram`: the ExportedProgram, its input and
output names and batch-1 example inputs. `TorchModel` runs it as a `Runtime`: the reference
outputs every candidate is validated against come from PyTorch itself. `export_onnx` writes
ONNX with a dynamic batch where the program has one; `export_litert` writes an fp32 TFLite
model whose signature carries the same input and output names.

Only `.pt2` files are read: a TorchScript archive or a pickled `torch.save` file is refused
before anything in it is loaded (unpickling runs code). torch is imported inside each function
(`edgekit[torch]`; litert-torch is `edgekit[torch-litert]`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.passes.base import Pass, PassContext, PassResult

from edgekit.errors import ConversionError, first_line
from edgekit.runtimes import Feeds, Runtime, TensorSpec

__all__ = [
    "DEFAULT_OPSET",
    "LiteRtTorchPass",
    "TorchExport",
    "TorchModel",
    "TorchProgram",
    "TorchToOnnxConfig",
    "TorchToOnnxPass",
    "check_torch_file",
    "export_litert",
    "export_module",
    "export_onnx",
    "load_pt2",
    "save_pt2",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
# opset 18: the dynamo exporter's lowest, and what onnxruntime 1.14 and newer load; the compat
# pass lowers the IR version for older runtimes.
DEFAULT_OPSET = 18
_SAVE_HINT = (
    "save the model with torch.export.save(torch.export.export(model, example_inputs), "
    "'model.pt2'), or pass the nn.Module itself to edgekit.converters.convert"
)
_MESSAGE_CHARS = 300


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            "PyTorch models need the torch extra: pip install 'edgekit[torch]' (torch 2.13.0)"
        ) from e
    return torch


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export and the exporters print progress and warnings meant for developers."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _short(error: BaseException) -> str:
    """The exporter's message, first line, at most a few hundred characters."""
    text = first_line(error)
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def check_torch_file(path: Path) -> None:
    """Refuse anything but a `torch.export.save` archive, without loading it."""
    if not path.exists():
        raise ConversionError(f"model {path} does not exist; check the path")
    if path.is_dir():
        raise ConversionError(f"{path} is a folder; expected a .pt2 file ({_SAVE_HINT})")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(2)
        what = "a pickled file (torch.save)" if head[:1] == b"\x80" else "not a PyTorch archive"
        raise ConversionError(f"{path} is {what}; edgekit reads .pt2 programs: {_SAVE_HINT}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path} is not a readable archive ({e}); {_SAVE_HINT}") from e
    parts = {part for name in names for part in name.split("/")[1:2]}
    if "models" in parts and any(name.endswith(".json") for name in names):
        return
    if "code" in parts or any(name.endswith("/constants.pkl") for name in names):
        raise ConversionError(
            f"{path} is a TorchScript archive (torch.jit.save); edgekit reads torch.export "
            f"programs: {_SAVE_HINT}"
        )
    if any(name.endswith("/data.pkl") for name in names):
        raise ConversionError(
            f"{path} is a pickled model or state_dict (torch.save); edgekit does not unpickle "
            f"files: {_SAVE_HINT}"
        )
    raise ConversionError(f"{path} is not a torch.export archive; {_SAVE_HINT}")


@dataclass(frozen=True)
class TorchProgram:
    """A PyTorch model ready to convert."""

    program: Any  # torch.export.ExportedProgram
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_inputs: tuple[Array, ...]  # batch 1, the program's own dtypes
    dynamic_batch: bool  # every input's first axis is symbolic
    source: str  # where it came from, for the report
    notes: tuple[str, ...] = ()

    def inputs(self) -> tuple[TensorSpec, ...]:
        """The program's inputs (batch axis `batch` when dynamic)."""
        return tuple(
            TensorSpec(name, str(value.dtype), self._shape(value.shape))
            for name, value in zip(self.input_names, self.example_inputs, strict=True)
        )

    def _shape(self, shape: tuple[int, ...]) -> tuple[int | str | None, ...]:
        """`shape` with its first axis named `batch` when the program's batch is dynamic."""
        if self.dynamic_batch and shape:
            return ("batch", *shape[1:])
        return tuple(shape)

    def details(self) -> dict[str, Any]:
        """JSON-ready form for the report's `source`."""
        torch = _torch()
        return {
            "format": "torch",
            "torch": str(torch.__version__),
            "program": self.source,
            "inputs": [spec.to_dict() for spec in self.inputs()],
            "outputs": list(self.output_names),
            "dynamic_batch": self.dynamic_batch,
        }


def _user_input_names(program: Any) -> tuple[str, ...]:
    return tuple(str(name) for name in program.graph_signature.user_inputs)


def _default_output_names(program: Any) -> tuple[str, ...]:
    # litert-torch names a signature's outputs output_0, output_1, ...; ONNX gets the same.
    count = len(program.graph_signature.user_outputs)
    return tuple(f"output_{index}" for index in range(count))


def _placeholder_inputs(program: Any) -> list[Any]:
    user = set(program.graph_signature.user_inputs)
    return [
        node.meta.get("val")
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user
    ]


def _is_dynamic_batch(program: Any) -> bool:
    torch = _torch()
    values = _placeholder_inputs(program)
    return bool(values) and all(
        value is not None and value.dim() >= 1 and isinstance(value.shape[0], torch.SymInt)
        for value in values
    )


def _batch_one_examples(program: Any) -> tuple[Array, ...]:
    """Batch-1 example inputs: the program's own, cut to one row where the first axis is a
    symbolic batch (a static axis keeps its size), else zeros of its shapes."""
    torch = _torch()
    stored = getattr(program, "example_inputs", None)
    if stored and stored[0] and not stored[1]:
        placeholders = _placeholder_inputs(program)
        return tuple(
            np.ascontiguousarray(value.detach().cpu().numpy()[:1])
            if value.dim() >= 1 and _symbolic_first_axis(placeholders, index)
            else value.detach().cpu().numpy()
            for index, value in enumerate(stored[0])
        )
    arrays = []
    for value in _placeholder_inputs(program):
        if value is None:
            raise ConversionError(
                "the .pt2 program records neither example inputs nor input shapes; export it "
                "again with torch.export.export(model, example_inputs)"
            )
        shape = [1 if isinstance(dim, torch.SymInt) else int(dim) for dim in value.shape]
        arrays.append(np.zeros(shape, dtype=_numpy_dtype(value.dtype)))
    return tuple(arrays)


def _symbolic_first_axis(placeholders: Sequence[Any], index: int) -> bool:
    torch = _torch()
    value = placeholders[index] if index < len(placeholders) else None
    return bool(value is not None and value.dim() >= 1 and isinstance(value.shape[0], torch.SymInt))


def _numpy_dtype(dtype: Any) -> Any:
    torch = _torch()
    return torch.empty((), dtype=dtype).numpy().dtype


def load_pt2(path: Path, *, output_names: Sequence[str] | None = None) -> TorchProgram:
    """Read a `torch.export.save` file (nothing else: see `check_torch_file`)."""
    check_torch_file(path)
    torch = _torch()
    try:
        with _quiet():
            program = torch.export.load(str(path))
    except Exception as e:  # torch raises RuntimeError/ValueError/KeyError for bad archives
        raise ConversionError(
            f"{path}: torch {torch.__version__} cannot load the program: {_short(e)}; export "
            f"it again with this torch version ({_SAVE_HINT})"
        ) from e
    names = _output_names(program, output_names)
    return TorchProgram(
        program=program,
        input_names=_user_input_names(program),
        output_names=names,
        example_inputs=_batch_one_examples(program),
        dynamic_batch=_is_dynamic_batch(program),
        source=f"{path.name} (torch.export)",
    )


def _output_names(program: Any, given: Sequence[str] | None) -> tuple[str, ...]:
    defaults = _default_output_names(program)
    if given is None:
        return defaults
    if len(given) != len(defaults) or len(set(given)) != len(given):
        raise ConversionError(
            f"output_names: the program has {len(defaults)} outputs, got {list(given)} "
            "(give one distinct name per output)"
        )
    return tuple(given)


def export_module(
    module: Any,
    example_inputs: Sequence[Any],
    *,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> TorchProgram:
    """`torch.export` an `nn.Module` on `example_inputs` (tensors or arrays, positional).

    With `dynamic_batch`, every input's first axis is exported as a symbolic `batch` (the
    examples are repeated to batch 2 first: torch specializes axes of size 1); when the model
    does not allow it, it is exported with the examples' static shapes and a note says why.
    Untraceable models raise `ConversionError` with the exporter's message, shortened.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise ConversionError(
            f"expected a torch.nn.Module, got {type(module).__name__}; for a saved model give "
            "the .pt2 path"
        )
    if not example_inputs:
        raise ConversionError("example_inputs: give one example tensor per forward() argument")
    tensors = tuple(torch.as_tensor(np.asarray(value)) for value in example_inputs)
    module = module.eval()
    notes: list[str] = []
    program = None
    if dynamic_batch and all(tensor.dim() >= 1 for tensor in tensors):
        doubled = tuple(torch.cat([tensor[:1], tensor[:1]]) for tensor in tensors)
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in tensors)
        try:
            with _quiet(), torch.no_grad():
                program = torch.export.export(module, doubled, dynamic_shapes=shapes)
        except Exception as e:  # noqa: BLE001  (a static export is tried next)
            notes.append(
                f"static batch: the model does not export with a dynamic batch ({_short(e)})"
            )
    elif dynamic_batch:
        notes.append("static batch: an input is a scalar")
    if program is None:
        try:
            with _quiet(), torch.no_grad():
                program = torch.export.export(module, tensors)
        except Exception as e:  # torch.export raises many types (UserError, Unsupported, ...)
            raise ConversionError(
                f"torch.export cannot trace {type(module).__name__}: {_short(e)}; make forward() "
                "traceable (no data-dependent Python control flow) or rewrite that branch with "
                "torch.cond"
            ) from e
    return TorchProgram(
        program=program,
        input_names=_user_input_names(program),
        output_names=_output_names(program, output_names),
        # Batch 1 where the batch is symbolic; a static program keeps the shapes it was
        # exported with (a [2, 1, 16] recurrent state is not a batch of two).
        example_inputs=tuple(
            np.ascontiguousarray(
                t.detach().cpu().numpy()[:1]
                if t.dim() and _symbolic_first_axis(_placeholder_inputs(program), index)
                else t.detach().cpu().numpy()
            )
            for index, t in enumerate(tensors)
        ),
        dynamic_batch=_is_dynamic_batch(program),
        source=f"{type(module).__name__} (nn.Module, torch.export)",
        notes=tuple(notes),
    )


def save_pt2(program: TorchProgram, path: Path) -> None:
    """Write the program with `torch.export.save` (what `load_pt2` reads back)."""
    torch = _torch()
    with _quiet():
        torch.export.save(program.program, str(path))


class TorchModel(Runtime):
    """The PyTorch program itself, run on the CPU: the reference outputs come from it."""

    engine = "torch"

    def __init__(self, program: TorchProgram) -> None:
        torch = _torch()
        self.version = str(torch.__version__)
        self._program = program
        self._module = program.program.module()
        self._inputs = program.inputs()
        examples = self.run(dict(zip(program.input_names, program.example_inputs, strict=True)))
        self._outputs = tuple(
            TensorSpec(name, str(value.dtype), program._shape(value.shape))
            for name, value in examples.items()
        )

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Feeds) -> dict[str, Array]:
        torch = _torch()
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self._program.input_names]
        with torch.no_grad():
            result = self._module(*args)
        values = list(result) if isinstance(result, (list, tuple)) else [result]
        return {
            name: np.asarray(value.detach().cpu().numpy())
            for name, value in zip(self._program.output_names, values, strict=True)
        }


@dataclass(frozen=True)
class TorchExport:
    """A file exported from a `TorchProgram`, and how."""

    path: Path
    exporter: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the report's `source.export`."""
        return {
            "exporter": self.exporter,
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "dynamic_batch": self.dynamic_batch,
            "notes": list(self.notes),
            **dict(self.details or {}),
        }


def export_onnx(
    program: TorchProgram, destination: Path, *, opset: int = DEFAULT_OPSET
) -> TorchExport:
    """ONNX through `torch.onnx.export(..., dynamo=True)`, named like the program, with a
    dynamic batch exactly when the program has one."""
    torch = _torch()
    try:
        with _quiet():
            exported = torch.onnx.export(
                program.program,
                args=tuple(torch.from_numpy(value) for value in program.example_inputs),
                dynamo=True,
                opset_version=opset,
                input_names=list(program.input_names),
                output_names=list(program.output_names),
                verbose=False,
            )
            if exported is None:
                raise ConversionError("torch.onnx.export returned no program")
            exported.save(str(destination))
    except ConversionError:
        raise
    except Exception as e:  # the exporter raises its own error types, undocumented
        raise ConversionError(
            f"torch.onnx.export (dynamo) cannot export {program.source}: {_short(e)}"
        ) from e
    notes = list(program.notes)
    if not program.dynamic_batch:
        notes.append(
            "the ONNX model has a static batch (the program was exported with fixed shapes)"
        )
    return TorchExport(
        path=destination,
        exporter=f"torch.onnx.export dynamo (torch {torch.__version__}, opset {opset})",
        input_names=program.input_names,
        output_names=program.output_names,
        dynamic_batch=program.dynamic_batch,
        notes=tuple(notes),
        details={"opset": opset},
    )


def export_litert(program: TorchProgram, destination: Path) -> TorchExport:
    """An fp32 TFLite model through litert-torch (batch 1), its signature named like the
    program (litert-torch itself names the inputs args_0, args_1, ...)."""
    torch = _torch()
    try:
        litert_torch = importlib.import_module("litert_torch")
    except ImportError as e:
        raise ConversionError(
            "PyTorch to TFLite through litert-torch needs the torch-litert extra: "
            "pip install 'edgekit[torch-litert]'"
        ) from e
    from importlib import metadata

    examples = tuple(torch.from_numpy(value) for value in program.example_inputs)
    try:
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):
            edge = litert_torch.convert(program.program.module(), examples)
            content = bytes(edge.model_content())
    except Exception as e:  # litert-torch raises lowering errors of many types
        raise ConversionError(
            f"litert-torch cannot convert {program.source}: {_short(e)}; try the ONNX path "
            "(onnx2tf)"
        ) from e
    destination.write_bytes(_rename_signature(content, program))
    return TorchExport(
        path=destination,
        exporter=f"litert-torch {metadata.version('litert-torch')} (torch {torch.__version__})",
        input_names=program.input_names,
        output_names=program.output_names,
        dynamic_batch=False,
        notes=("litert-torch keeps the PyTorch layout (NCHW inputs, transposes inside)",),
    )


def _rename_signature(content: bytes, program: TorchProgram) -> bytes:
    """The model with its signature's inputs and outputs named like the program."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    if len(model.signatureDefs) != 1:
        raise ConversionError(
            f"litert-torch wrote {len(model.signatureDefs)} signatures, expected one"
        )
    signature = model.signatureDefs[0]
    for side, names in ((signature.inputs, program.input_names),
                        (signature.outputs, program.output_names)):  # fmt: skip
        if len(side) != len(names):
            raise ConversionError(
                f"litert-torch's signature has {len(side)} tensors where the program has "
                f"{len(names)} ({list(names)})"
            )
        # litert-torch orders them args_0, args_1, ... / output_0, output_1, ...
        ordered = sorted(side, key=lambda item: _index(item.name))
        for item, name in zip(ordered, names, strict=True):
            item.name = name.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _index(name: bytes | str) -> int:
    text = name.decode() if isinstance(name, bytes) else name
    digits = text.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0


@dataclass(frozen=True)
class TorchToOnnxConfig:
    """Opset of the ONNX export and optional output names."""

    opset: int = DEFAULT_OPSET
    output_names: tuple[str, ...] | None = None


class TorchToOnnxPass(Pass):
    """A `.pt2` file in, an ONNX file out (torch.onnx's dynamo exporter)."""

    name = "torch_to_onnx"

    def __init__(self, config: TorchToOnnxConfig | None = None) -> None:
        self.config = config or TorchToOnnxConfig()

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        program = load_pt2(source, output_names=self.config.output_names)
        return _pass_result(program, export_onnx(program, destination, opset=self.config.opset))


class LiteRtTorchPass(TorchToOnnxPass):
    """A `.pt2` file in, an fp32 `.tflite` file out (litert-torch, batch 1); the config's
    opset is not used."""

    name = "litert_torch"

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        program = load_pt2(source, output_names=self.config.output_names)
        return _pass_result(program, export_litert(replace(program, notes=()), destination))


def _pass_result(program: TorchProgram, export: TorchExport) -> PassResult:
    return PassResult(notes=export.notes, details={**program.details(), "export": export.to_dict()})
