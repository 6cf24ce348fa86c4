"""Individual passes: weight-only int8, pruning, compat down-conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgekit.converters.compat import onnx_limits_for_onnxruntime
from edgekit.converters.examples import DigitsExample
from edgekit.converters.passes import get_pass, registered_passes
from edgekit.converters.passes.base import PassContext
from edgekit.converters.passes.onnx_passes import CompatConfig, CompatPass, PruneConfig, PrunePass
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import ConversionError
from edgekit.profiles import load_profile


def _context(tmp_path: Path) -> PassContext:
    return PassContext(profile=load_profile("raspberrypi"), workdir=tmp_path, threads=1)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_registry_has_every_pass() -> None:
    assert {
        "load",
        "optimize",
        "weight_int8",
        "prune",
        "dynamic_int8",
        "static_int8",
        "fp16",
        "compat",
    } <= set(registered_passes())
    with pytest.raises(ConversionError, match="no conversion pass named 'nope'"):
        get_pass("nope")


def test_weight_int8_quarter_size_same_outputs(digits: DigitsExample, tmp_path: Path) -> None:
    out = tmp_path / "w8.onnx"
    get_pass("weight_int8")().run(digits.model_path, out, _context(tmp_path))
    assert out.stat().st_size < 0.3 * digits.model_path.stat().st_size
    model = onnx.load(str(out))
    int8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    # conv2 and both dense layers; conv1's 144 weights are below the 256-element threshold.
    assert sorted(i.name for i in int8) == ["w2__int8", "w3__int8", "w4__int8"]
    x = digits.x_test[:32]
    found, expected = _run(out, x), _run(digits.model_path, x)
    np.testing.assert_allclose(found, expected, rtol=0.05, atol=0.2)
    assert (found.argmax(1) == expected.argmax(1)).all()


def test_prune_reaches_sparsity(digits: DigitsExample, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    result = PrunePass(PruneConfig(sparsity=0.5, min_elements=1024)).run(
        digits.model_path, out, _context(tmp_path)
    )
    assert result.details["sparsity"] == pytest.approx(0.5, abs=0.01)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert float((weights["w3"] == 0).mean()) == pytest.approx(0.5, abs=0.01)
    assert float((weights["b3"] == 0).mean()) < 0.5  # small tensors keep their values


def _opset21_model(path: Path, *, int4: bool = False) -> None:
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = [weight]
    if int4:
        inits.append(helper.make_tensor("q", TensorProto.INT4, [2], [1, 2]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_compat_lowers_ir_and_opset_for_onnxruntime_1_16(tmp_path: Path) -> None:
    source, out = tmp_path / "new.onnx", tmp_path / "old.onnx"
    _opset21_model(source)
    result = CompatPass(CompatConfig(runtime_version="1.16.3")).run(source, out, _context(tmp_path))
    model = onnx.load(str(out))
    assert model.ir_version == 9
    assert model.opset_import[0].version == 19
    assert result.details["changes"] == ["opset 21 -> 19", "IR version 10 -> 9"]
    x = np.arange(4, dtype=np.float32)[None]
    np.testing.assert_array_equal(_run(out, x), x)


def test_compat_refuses_what_the_runtime_cannot_load(tmp_path: Path) -> None:
    source = tmp_path / "int4.onnx"
    _opset21_model(source, int4=True)
    with pytest.raises(ConversionError, match=r"IR version 10 cannot be lowered to 9 .*uses int4"):
        CompatPass(CompatConfig(runtime_version="1.16.3")).run(
            source, tmp_path / "x.onnx", _context(tmp_path)
        )


def test_onnxruntime_limits_table() -> None:
    limits = onnx_limits_for_onnxruntime("1.16.3")
    assert (limits.max_ir_version, limits.max_opset) == (9, 19)
    assert onnx_limits_for_onnxruntime("1.99.0").max_ir_version >= 11
    with pytest.raises(ValueError, match="older than edgekit supports"):
        onnx_limits_for_onnxruntime("1.2.0")
