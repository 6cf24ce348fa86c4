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

__all__ = [
    "OnnxRuntimeBackend",
    "Runtime",
    "RuntimeLoadError",
    "TensorSpec",
    "open_runtime",
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
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


Feeds = Mapping[str, npt.NDArray[Any]]


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
        options.log_severity_level = 3
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        source = str(model) if isinstance(model, Path) else model
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


def open_runtime(path: Path, *, threads: int | None = None) -> Runtime:
    """Open a model file with the backend its extension calls for."""
    if path.suffix == ".onnx":
        return OnnxRuntimeBackend(path, threads=threads)
    raise RuntimeLoadError(
        f"{path}: no runtime for {path.suffix!r} files yet; expected a .onnx model"
    )
