"""One `Runtime` interface over the inference engines a device runs.

Shared by the converter's validation and benchmarks and by the agent: loading a model from a
path, describing its inputs and outputs, running a batch, reporting the engine's version. Each
backend imports its engine inside its constructor, so importing this module costs nothing.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit.errors import EdgekitError, first_line
from edgekit.quiet import disable_onnxruntime_telemetry

__all__ = [
    "LiteRtBackend",
    "OnnxRuntimeBackend",
    "Runtime",
    "RuntimeLoadError",
    "TensorSpec",
    "dequantize",
    "dequantize_output",
    "load_litert",
    "model_feed",
    "open_runtime",
    "quantize_input",
]

log = logging.getLogger(__name__)

# onnxruntime's type strings -> numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


class RuntimeLoadError(EdgekitError):
    """The runtime refused to load a model (unsupported IR, opset, op version, corrupt file)."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of one model input or output.

    Dimensions are ints when fixed and strings (the symbolic name) or None when dynamic.
    `quantization` is (scale, zero_point) for an integer tensor of a quantized TFLite model:
    real value = scale * (stored value - zero_point).
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    quantization: tuple[float, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        plain: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            plain["quantization"] = {
                "scale": self.quantization[0],
                "zero_point": self.quantization[1],
            }
        return plain


def quantize_input(spec: TensorSpec, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Real-valued `values` in the input's own dtype (rounded and clipped when quantized)."""
    target = np.dtype(spec.dtype)
    if values.dtype == target:
        return values
    if spec.quantization is None or target.kind not in "iu":
        return values.astype(target)
    scale, zero_point = spec.quantization
    info = np.iinfo(target)
    stored = np.round(np.asarray(values, dtype=np.float64) / scale) + zero_point
    result: npt.NDArray[Any] = np.clip(stored, info.min, info.max).astype(target)
    return result


def dequantize_output(spec: TensorSpec, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A quantized output as float32 real values; anything else unchanged."""
    return dequantize(values, spec.quantization)


def dequantize(
    values: npt.NDArray[Any], quantization: tuple[float, int] | None
) -> npt.NDArray[Any]:
    """Integer `values` as float32 real values, scale * (values - zero_point), when
    `quantization` (scale, zero_point) is given; anything else unchanged."""
    if quantization is None or np.asarray(values).dtype.kind not in "iu":
        return values
    scale, zero_point = quantization
    real: npt.NDArray[Any] = ((values.astype(np.float64) - zero_point) * scale).astype(np.float32)
    return real


Feeds = Mapping[str, npt.NDArray[Any]]


def model_feed(runtime: Runtime, feed: Feeds) -> dict[str, npt.NDArray[Any]]:
    """A feed of real values in the model's own input dtypes (quantized for int8/uint8 I/O);
    entries the model has no input for are left out."""
    specs = {spec.name: spec for spec in runtime.inputs}
    return {
        name: quantize_input(specs[name], value) for name, value in feed.items() if name in specs
    }


class Runtime(abc.ABC):
    """A loaded model, ready to run batches."""

    engine: str
    version: str

    @property
    @abc.abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in order."""

    @property
    @abc.abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in order."""

    @abc.abstractmethod
    def run(self, feeds: Feeds) -> dict[str, npt.NDArray[Any]]:
        """Run one batch; returns every output by name."""


class OnnxRuntimeBackend(Runtime):
    """onnxruntime on the CPU execution provider."""

    engine = "onnxruntime"

    def __init__(
        self,
        model: Path | bytes,
        *,
        threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Fatal only: every failure raises with its message, and the caller reports it (a 500,
        # a probation error count); an error line on stderr per failed request would flood a
        # device's journal.
        options.log_severity_level = 4
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        source = str(model) if isinstance(model, Path) else model
        disable_onnxruntime_telemetry(ort)
        try:
            self._session = ort.InferenceSession(
                source, options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            where = model if isinstance(model, Path) else "<bytes>"
            raise RuntimeLoadError(
                f"onnxruntime {ort.__version__} cannot load {where}: {first_line(e)}"
            ) from e
        self.version = str(ort.__version__)
        self._inputs = tuple(_ort_spec(arg) for arg in self._session.get_inputs())
        self._outputs = tuple(_ort_spec(arg) for arg in self._session.get_outputs())

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Feeds) -> dict[str, npt.NDArray[Any]]:
        values = self._session.run(None, dict(feeds))
        return {
            spec.name: np.asarray(value) for spec, value in zip(self._outputs, values, strict=True)
        }


def _ort_spec(arg: Any) -> TensorSpec:
    shape = tuple(
        dim if isinstance(dim, int) else (str(dim) if dim is not None else None)
        for dim in (arg.shape or ())
    )
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)


# Where a LiteRT interpreter comes from, in order of preference: (module, engine name).
_LITERT_MODULES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow.lite"),
)


def load_litert() -> tuple[Any, str, str]:
    """The first importable LiteRT interpreter module, its engine name and its version."""
    import importlib

    missing = []
    for module_name, engine in _LITERT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name.split(".")[0])
            continue
        return module, engine, _litert_version(module_name, engine)
    raise RuntimeLoadError(
        f"no TFLite runtime installed (tried {', '.join(missing)}); "
        "pip install ai-edge-litert (or tflite-runtime on older devices)"
    )


def _litert_version(module_name: str, engine: str) -> str:
    from importlib import metadata

    distribution = {"ai-edge-litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}
    try:
        if engine in distribution:
            return metadata.version(distribution[engine])
        import tensorflow

        return str(tensorflow.__version__)
    except (metadata.PackageNotFoundError, ImportError, AttributeError):
        return "unknown"


class LiteRtBackend(Runtime):
    """A TFLite model on LiteRT (`ai_edge_litert`, else `tflite_runtime`, else `tensorflow.lite`).

    Inputs and outputs are named by the model's serving signature when it has exactly one
    (`pixels`, `logits`), else by its tensor names. `run` takes and returns the model's own
    dtypes (int8/uint8 for a fully quantized model; see `quantize_input`/`dequantize_output`)
    and resizes the input tensors when a batch's shape differs from the last one.
    """

    def __init__(self, model: Path | bytes, *, threads: int | None = None) -> None:
        module, engine, version = load_litert()
        self.engine = engine
        self.version = version
        where = model if isinstance(model, Path) else "<bytes>"
        arguments: dict[str, Any] = {"num_threads": threads} if threads is not None else {}
        try:
            if isinstance(model, Path):
                interpreter = module.Interpreter(model_path=str(model), **arguments)
            else:
                interpreter = module.Interpreter(model_content=bytes(model), **arguments)
            interpreter.allocate_tensors()
        except Exception as e:  # the interpreter raises ValueError/RuntimeError, undocumented
            raise RuntimeLoadError(
                f"{engine} {version} cannot load {where}: {first_line(e)}"
            ) from e
        self._interpreter = interpreter
        input_details = interpreter.get_input_details()
        output_details = interpreter.get_output_details()
        input_names = {detail["index"]: str(detail["name"]) for detail in input_details}
        output_names = {detail["index"]: str(detail["name"]) for detail in output_details}
        signatures = interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = interpreter.get_signature_runner(next(iter(signatures)))
            input_names = {d["index"]: name for name, d in runner.get_input_details().items()}
            output_names = {d["index"]: name for name, d in runner.get_output_details().items()}
        self._input_index = {input_names[d["index"]]: int(d["index"]) for d in input_details}
        self._inputs = tuple(_litert_spec(input_names[d["index"]], d) for d in input_details)
        self._outputs = tuple(_litert_spec(output_names[d["index"]], d) for d in output_details)
        self._output_index = [
            (spec.name, int(d["index"]))
            for spec, d in zip(self._outputs, output_details, strict=True)
        ]
        self._shapes = {int(d["index"]): tuple(int(x) for x in d["shape"]) for d in input_details}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Feeds) -> dict[str, npt.NDArray[Any]]:
        interpreter = self._interpreter
        resized = False
        for name, index in self._input_index.items():
            shape = tuple(int(x) for x in np.shape(feeds[name]))
            if shape != self._shapes[index]:
                interpreter.resize_tensor_input(index, list(shape), strict=False)
                self._shapes[index] = shape
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for name, index in self._input_index.items():
            interpreter.set_tensor(index, np.ascontiguousarray(feeds[name]))
        interpreter.invoke()
        # get_tensor copies; the interpreter reuses its buffers on the next invoke.
        return {name: np.array(interpreter.get_tensor(index)) for name, index in self._output_index}


def _litert_spec(name: str, detail: Mapping[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature", detail["shape"])
    shape = tuple(None if int(dim) < 0 else int(dim) for dim in signature)
    dtype = np.dtype(detail["dtype"]).name
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantization = (
        (float(scale), int(zero_point)) if scale and np.dtype(dtype).kind in "iu" else None
    )
    return TensorSpec(name=name, dtype=dtype, shape=shape, quantization=quantization)


def open_runtime(path: Path, *, threads: int | None = None) -> Runtime:
    """Open a model file with the backend its extension calls for."""
    if path.suffix == ".onnx":
        return OnnxRuntimeBackend(path, threads=threads)
    if path.suffix == ".tflite":
        return LiteRtBackend(path, threads=threads)
    raise RuntimeLoadError(
        f"{path}: no runtime for {path.suffix!r} files; expected a .onnx or .tflite model"
    )
