"""Tiny ONNX models built with onnx.helper for the serving tests, and a runtime wrapper that
holds a request inside a real onnxruntime session until the test releases it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.runtimes import OnnxRuntimeBackend, Runtime, TensorSpec

Array = npt.NDArray[Any]

_RNG_WEIGHTS = np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32)
_BIAS = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def linear_model(path: Path, *, scale: float = 1.0) -> Path:
    """`y = x @ (W * scale) + b`: x float32 [N, 4] -> y float32 [N, 3]."""
    weights = numpy_helper.from_array(_RNG_WEIGHTS * np.float32(scale), "W")
    bias = numpy_helper.from_array(_BIAS, "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[weights, bias],
    )
    return _save(graph, path)


def linear_expected(x: Array, *, scale: float = 1.0) -> Array:
    """What `linear_model(scale=scale)` computes."""
    return np.asarray(x, dtype=np.float32) @ (_RNG_WEIGHTS * np.float32(scale)) + _BIAS


def two_input_model(path: Path) -> Path:
    """`out = a + float(b)` and `doubled = 2 a`: a float32 [N, 4], b int64 [N, 1]."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "bf"], ["out"]),
            helper.make_node("Mul", ["a", "two"], ["doubled"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 1]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 4]),
        ],
        initializer=[two],
    )
    return _save(graph, path)


def uint8_model(path: Path) -> Path:
    """`y = float(x) / 255`: x uint8 [1, 8] (fixed shape) -> y float32 [1, 8]."""
    scale = numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["xf", "scale"], ["y"]),
        ],
        "uint8",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[scale],
    )
    return _save(graph, path)


def reshape_model(path: Path) -> Path:
    """Reshapes x float32 [N, 4] to [3, -1]: valid input, but the runtime fails unless N is a
    multiple of 3 (a real runtime error, not a validation error)."""
    shape = numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])],
        initializer=[shape],
    )
    return _save(graph, path)


class GatedRuntime(Runtime):
    """A real onnxruntime model whose `run` waits for `release` after signalling `entered`:
    lets a test hold a request in flight across a swap. Counts closes."""

    engine = "onnxruntime"

    def __init__(self, model: Path) -> None:
        self._inner = OnnxRuntimeBackend(model)
        self.version = self._inner.version
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = 0

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inner.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._inner.outputs

    def run(self, feeds: Any) -> dict[str, Array]:
        self.entered.set()
        if not self.release.wait(timeout=30):
            raise TimeoutError("the test never released the gated runtime")
        return self._inner.run(feeds)

    def close(self) -> None:
        self.closed += 1
