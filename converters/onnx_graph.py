"""ONNX graph canonicalisation: one form for every model before and after every pass.

Exporters store weights in two places (initializers or `Constant` nodes), leave nodes unnamed,
and quantizers write nodes in an order that ignores what `If`/`Loop` bodies read from the outer
graph. Every weight-based pass would see a different model depending on which optimizer ran
first, and the same inputs could give different bytes. `canonicalize` fixes all of that:

- `Constant` nodes become initializers of the graph they live in (subgraphs included);
- every node has a unique, deterministic name (`<op_type>_<index>` for unnamed ones);
- nodes are topologically sorted, counting the outer-scope values a subgraph reads as inputs
  of the node that owns the subgraph; ties keep the original order;
- initializers nothing reads are dropped; the rest are ordered by first use.

The result depends only on the model's content, never on hash seeds or dict order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "WeightTensor",
    "all_graphs",
    "canonicalize",
    "graph_reads",
    "opset_version",
    "weight_tensors",
]


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph below it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from all_graphs(attribute.g)
            for sub in attribute.graphs:
                yield from all_graphs(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` reads from its enclosing scope (the implicit inputs of its owner node)."""
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    reads: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                reads.add(name)
        for sub in _subgraphs(node):
            reads |= {name for name in graph_reads(sub) if name not in defined}
        defined.update(node.output)
    return reads


def _node_reads(node: onnx.NodeProto) -> list[str]:
    names = [name for name in node.input if name]
    for sub in _subgraphs(node):
        names.extend(sorted(graph_reads(sub)))
    return names


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a `Constant` node produces, or None for forms that stay nodes (sparse)."""
    from onnx import helper, numpy_helper

    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.name == "value":
            tensor: onnx.TensorProto = value
            return tensor
        if attribute.name in ("value_float", "value_int"):
            dtype = np.float32 if attribute.name == "value_float" else np.int64
            return numpy_helper.from_array(np.array(value, dtype=dtype))
        if attribute.name in ("value_floats", "value_ints"):
            dtype = np.float32 if attribute.name == "value_floats" else np.int64
            return numpy_helper.from_array(np.array(list(value), dtype=dtype))
        if attribute.name == "value_string":
            return numpy_helper.from_array(np.array(value, dtype=object))
        if attribute.name == "value_strings":
            return numpy_helper.from_array(np.array(list(value), dtype=object))
    return None


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    import onnx

    kept: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and not node.domain else None
        if tensor is None:
            kept.append(node)
            continue
        initializer = onnx.TensorProto()
        initializer.CopyFrom(tensor)
        initializer.name = node.output[0]
        graph.initializer.append(initializer)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Stable topological sort (Kahn's algorithm, original index breaks ties)."""
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer.setdefault(name, index)
    waiting = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for index, node in enumerate(nodes):
        for source in sorted({producer[name] for name in _node_reads(node) if name in producer}):
            if source != index:
                waiting[index] += 1
                consumers[source].append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers[index]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(ready, consumer)
    if len(order) != len(nodes):  # a cycle: leave the order alone, the checker will say why
        return
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[index] for index in order)


def _order_initializers(graph: onnx.GraphProto, *, keep: set[str]) -> None:
    """Initializers in order of first use; unread ones dropped unless in `keep`."""
    first_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in _node_reads(node):
            first_use.setdefault(name, index)
    for position, value in enumerate(graph.output):
        first_use.setdefault(value.name, len(graph.node) + position)
    initializers = list(graph.initializer)
    used = [init for init in initializers if init.name in first_use or init.name in keep]
    used.sort(key=lambda init: (first_use.get(init.name, -1), init.name))
    if [init.name for init in used] != [init.name for init in initializers]:
        del graph.initializer[:]
        graph.initializer.extend(used)


def _name_nodes(model: onnx.ModelProto) -> None:
    taken: set[str] = set()
    counters: dict[str, int] = {}
    for graph in all_graphs(model.graph):
        for node in graph.node:
            name = node.name
            if not name or name in taken:
                base = node.name or node.op_type
                while True:
                    counters[base] = counters.get(base, 0) + 1
                    name = f"{base}_{counters[base]}"
                    if name not in taken:
                        break
                node.name = name
            taken.add(name)


def canonicalize(model: onnx.ModelProto) -> dict[str, int]:
    """Bring `model` into the canonical form described in the module docstring, in place.

    Returns counts of what changed (`constants`), for the pass's report.
    """
    moved = 0
    graph_inputs = {value.name for value in model.graph.input}
    for graph in all_graphs(model.graph):
        moved += _constants_to_initializers(graph)
    for graph in all_graphs(model.graph):
        _sort_nodes(graph)
        # An initializer that is also a graph input (IR < 4 style) is part of the signature.
        keep = graph_inputs if graph is model.graph else set()
        _order_initializers(graph, keep=keep)
    _name_nodes(model)
    return {"constants": moved}


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 0)


# (op type, input index) -> the axis that holds output channels, for per-channel scales.
_CHANNEL_AXIS: dict[tuple[str, int], int] = {
    ("Conv", 1): 0,
    ("ConvTranspose", 1): 1,
    ("MatMul", 1): -1,
    ("Gemm", 1): -1,  # 0 when transB=1
    ("Gather", 0): 0,  # embedding tables
    ("LSTM", 1): 1,  # W: [directions, 4*hidden, input]
    ("LSTM", 2): 1,  # R: [directions, 4*hidden, hidden]
    ("GRU", 1): 1,
    ("GRU", 2): 1,
    ("RNN", 1): 1,
    ("RNN", 2): 1,
}


@dataclass(frozen=True)
class WeightTensor:
    """A float initializer worth storing as int8, where it lives and its channel axis."""

    name: str
    graph_index: int  # position of the graph holding it in `all_graphs` order (0: main graph)
    axis: int
    elements: int


def weight_tensors(model: onnx.ModelProto, *, min_elements: int) -> list[WeightTensor]:
    """Float32 initializers of at least `min_elements` elements and rank >= 2, in any graph.

    The channel axis comes from the first consumer that names one (Conv, MatMul, Gemm, Gather,
    LSTM/GRU/RNN); weights that reach their op through other nodes (a Slice feeding an LSTM
    inside an `If`, as in exported recurrent models) use axis 0. Initializers that are also graph
    inputs (overridable at run time) are never touched.
    """
    import onnx

    found: list[WeightTensor] = []
    graph_inputs = {value.name for value in model.graph.input}
    for graph_index, graph in enumerate(all_graphs(model.graph)):
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node, index))
        for init in graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT or init.name in graph_inputs:
                continue
            elements = math.prod(init.dims)
            if elements < min_elements or len(init.dims) < 2:
                continue
            axis = 0
            for node, index in consumers.get(init.name, []):
                if (node.op_type, index) not in _CHANNEL_AXIS:
                    continue
                axis = _CHANNEL_AXIS[(node.op_type, index)]
                if node.op_type == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axis = 0 if trans_b else 1
                break
            found.append(
                WeightTensor(
                    name=init.name,
                    graph_index=graph_index,
                    axis=axis % len(init.dims),
                    elements=elements,
                )
            )
    return found
