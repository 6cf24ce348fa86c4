"""Models the converter tests build themselves from the trained digits CNN."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper


def constant_weights_at_opset12(source: Path, dest: Path) -> Path:
    """The same network at opset 12 with every weight in a `Constant` node, as some exporters
    write it (and as onnxruntime's quantizers refuse: "Expected ... to be an initializer").

    The digits CNN's ops (Conv, Relu, MaxPool, Flatten, Gemm) mean the same at opset 12, so
    only the import changes (onnx's version converter has no downward adapter for Relu).
    """
    model = onnx.load(str(source))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 12
    constants = [
        helper.make_node("Constant", [], [init.name], value=init, name=f"{init.name}_constant")
        for init in model.graph.initializer
    ]
    nodes = [*constants, *model.graph.node]
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest
