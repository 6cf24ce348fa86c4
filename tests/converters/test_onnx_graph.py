"""Canonical ONNX form: weights as initializers everywhere, sorted nodes, stable names."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from edgekit.converters.onnx_graph import all_graphs, canonicalize, weight_tensors
from onnx import TensorProto, helper, numpy_helper


def _branch(name: str, weight: np.ndarray) -> onnx.GraphProto:
    """An If branch that reads `h` from the outer graph and multiplies it by its own weight."""
    return helper.make_graph(
        [
            helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight)),
            helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"]),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 32])],
    )


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 32)).astype(np.float32)
    then_w = rng.normal(size=(32, 32)).astype(np.float32)
    else_w = rng.normal(size=(32, 32)).astype(np.float32)
    nodes = [
        # The If comes first in the file although it reads `h`, produced below: the order some
        # quantizers write, which the ONNX checker refuses.
        helper.make_node(
            "If", ["flag"], ["y"], then_branch=_branch("then", then_w),
            else_branch=_branch("else", else_w),
        ),
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Constant", [], ["unused"], value_float=3.0),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def test_constants_become_initializers_in_every_graph_and_order_is_fixed() -> None:
    model = _model()
    changes = canonicalize(model)
    assert changes == {"constants": 4}
    graphs = list(all_graphs(model.graph))
    assert [n.op_type for n in model.graph.node] == ["MatMul", "If"]
    assert all(n.op_type != "Constant" for g in graphs for n in g.node)
    assert {i.name for i in model.graph.initializer} == {"w"}  # `unused` dropped
    assert sorted(i.name for g in graphs[1:] for i in g.initializer) == ["else_w", "then_w"]
    assert len({n.name for g in graphs for n in g.node}) == sum(len(g.node) for g in graphs)
    onnx.checker.check_model(model)
    x = np.ones((1, 16), np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x, "flag": np.array(True)})
    assert y.shape == (1, 32)


def test_canonical_form_is_a_fixed_point_and_byte_stable() -> None:
    first, second = _model(), _model()
    canonicalize(first)
    canonicalize(second)
    again = onnx.ModelProto()
    again.CopyFrom(first)
    assert canonicalize(again) == {"constants": 0}
    assert first.SerializeToString() == second.SerializeToString() == again.SerializeToString()


def test_weight_tensors_reach_subgraph_initializers() -> None:
    model = _model()
    canonicalize(model)
    found = {w.name: w for w in weight_tensors(model, min_elements=256)}
    assert set(found) == {"w", "then_w", "else_w"}
    assert found["w"].graph_index == 0 and found["then_w"].graph_index > 0
    assert found["w"].axis == 1  # MatMul's output channels
