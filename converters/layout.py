"""Tensor layouts that differ between a source model and its artifact, and the helpers that
feed and judge the artifact in its own layout.

onnx2tf converts a channels-first ONNX graph (NCHW images, NCW sequences) into a channels-last
TensorFlow graph, so a converted model may expect its inputs transposed (`[1, 1, 8, 8]` ->
`[1, 8, 8, 1]`) and give some outputs transposed. `LayoutMap` records, per input and output,
the permutation from the source's layout to the artifact's: `artifact = source.transpose(perm)`.
The report and golden samples carry it so that the device agent (and anyone calling the
artifact) feeds the layout the artifact expects, and validation compares the artifact's outputs
with the source model's outputs moved into the artifact's layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit.runtimes import Feeds, Runtime, TensorSpec

__all__ = [
    "LayoutMap",
    "TensorLayout",
    "TransposedRuntime",
    "channels_last_permutation",
    "golden_layout_entries",
]

Array = npt.NDArray[Any]


def channels_last_permutation(rank: int) -> tuple[int, ...]:
    """The permutation that moves axis 1 (channels) last: NCHW -> NHWC, NCW -> NWC."""
    if rank < 3:
        return tuple(range(rank))
    return (0, *range(2, rank), 1)


@dataclass(frozen=True)
class TensorLayout:
    """One input or output: its shape in the source and in the artifact, and the permutation
    between them (`artifact_value = np.transpose(source_value, permutation)`)."""

    name: str
    source_shape: tuple[int | str | None, ...]
    artifact_shape: tuple[int | str | None, ...]
    permutation: tuple[int, ...]

    @property
    def transposed(self) -> bool:
        """Whether the artifact's layout differs from the source's."""
        return self.permutation != tuple(range(len(self.permutation)))

    @property
    def inverse(self) -> tuple[int, ...]:
        """The permutation from the artifact's layout back to the source's."""
        return tuple(int(axis) for axis in np.argsort(self.permutation))

    def to_artifact(self, value: Array) -> Array:
        """A source-layout array in the artifact's layout."""
        if not self.transposed or np.ndim(value) != len(self.permutation):
            return value
        return np.ascontiguousarray(np.transpose(value, self.permutation))

    def to_source(self, value: Array) -> Array:
        """An artifact-layout array in the source's layout."""
        if not self.transposed or np.ndim(value) != len(self.permutation):
            return value
        return np.ascontiguousarray(np.transpose(value, self.inverse))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the report's `layout.inputs[]` / `layout.outputs[]`)."""
        return {
            "name": self.name,
            "source_shape": list(self.source_shape),
            "artifact_shape": list(self.artifact_shape),
            "permutation": list(self.permutation),
            "transposed": self.transposed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorLayout:
        """The inverse of `to_dict`."""
        return cls(
            name=str(data["name"]),
            source_shape=tuple(data["source_shape"]),
            artifact_shape=tuple(data["artifact_shape"]),
            permutation=tuple(int(axis) for axis in data["permutation"]),
        )


@dataclass(frozen=True)
class LayoutMap:
    """Every input's and output's layout change between a source model and its artifact."""

    inputs: tuple[TensorLayout, ...]
    outputs: tuple[TensorLayout, ...]

    @property
    def transposed(self) -> bool:
        """Whether any input or output changes layout."""
        return any(item.transposed for item in (*self.inputs, *self.outputs))

    def input(self, name: str) -> TensorLayout | None:
        """The layout of input `name` (None: not recorded, i.e. unchanged)."""
        return next((item for item in self.inputs if item.name == name), None)

    def output(self, name: str) -> TensorLayout | None:
        """The layout of output `name` (None: not recorded, i.e. unchanged)."""
        return next((item for item in self.outputs if item.name == name), None)

    def feed_to_artifact(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        """A source-layout feed as the artifact expects it."""
        return {name: _apply(self.input(name), value, True) for name, value in feed.items()}

    def feed_to_source(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        """An artifact-layout feed as the source model expects it."""
        return {name: _apply(self.input(name), value, False) for name, value in feed.items()}

    def outputs_to_artifact(self, outputs: Mapping[str, Array]) -> dict[str, Array]:
        """The source model's outputs in the artifact's layout (what validation compares)."""
        return {name: _apply(self.output(name), value, True) for name, value in outputs.items()}

    def outputs_to_source(self, outputs: Mapping[str, Array]) -> dict[str, Array]:
        """The artifact's outputs in the source model's layout."""
        return {name: _apply(self.output(name), value, False) for name, value in outputs.items()}

    def dataset_to_artifact(self, dataset: Any) -> Any:
        """An `edgekit.converters.data.Dataset` of source-layout feeds in the artifact's layout
        (calibration and validation data are given as for the source model)."""
        if not self.transposed:
            return dataset
        feeds = tuple(self.feed_to_artifact(feed) for feed in dataset.feeds)
        notes = (*dataset.notes, f"inputs transposed for the artifact: {self.describe()}")
        return replace(dataset, feeds=feeds, notes=notes)

    def reference_to_artifact(
        self, reference: Mapping[str, Sequence[Array]]
    ) -> dict[str, list[Array]]:
        """Per-output lists of source outputs (the pipeline's `reference`) in artifact layout."""
        return {
            name: [_apply(self.output(name), value, True) for value in values]
            for name, values in reference.items()
        }

    def describe(self) -> str:
        """One line for notes: `pixels [1, 1, 8, 8] -> [1, 8, 8, 1] (perm 0,2,3,1)`."""
        moved = [item for item in (*self.inputs, *self.outputs) if item.transposed]
        if not moved:
            return "no tensor changes layout"
        return "; ".join(
            f"{item.name} {list(item.source_shape)} -> {list(item.artifact_shape)} "
            f"(perm {','.join(map(str, item.permutation))})"
            for item in moved
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the report's `layout` section."""
        return {
            "transposed": self.transposed,
            "inputs": [item.to_dict() for item in self.inputs],
            "outputs": [item.to_dict() for item in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayoutMap:
        """The inverse of `to_dict`."""
        return cls(
            inputs=tuple(TensorLayout.from_dict(item) for item in data.get("inputs", ())),
            outputs=tuple(TensorLayout.from_dict(item) for item in data.get("outputs", ())),
        )

    @classmethod
    def identity(cls, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> LayoutMap:
        """No layout change (the artifact takes and gives what the source does)."""

        def same(spec: TensorSpec) -> TensorLayout:
            return TensorLayout(spec.name, spec.shape, spec.shape, tuple(range(len(spec.shape))))

        return cls(tuple(map(same, inputs)), tuple(map(same, outputs)))


def _apply(layout: TensorLayout | None, value: Array, forward: bool) -> Array:
    if layout is None:
        return value
    return layout.to_artifact(value) if forward else layout.to_source(value)


def golden_layout_entries(layout: LayoutMap) -> dict[str, Array]:
    """`golden.npz` entries naming each transposed tensor's permutation (source -> artifact):
    `layout/inputs/<name>` and `layout/outputs/<name>` = int64 permutation. The golden inputs and
    outputs themselves are stored in the artifact's layout, as the agent feeds them."""
    entries: dict[str, Array] = {}
    for side, items in (("inputs", layout.inputs), ("outputs", layout.outputs)):
        for item in items:
            if item.transposed:
                entries[f"layout/{side}/{item.name}"] = np.asarray(item.permutation, np.int64)
    return entries


class TransposedRuntime(Runtime):
    """The source model presented in the artifact's layout: takes artifact-layout feeds, runs
    the source, returns its outputs in the artifact's layout. The pipeline's reference."""

    def __init__(self, source: Runtime, layout: LayoutMap) -> None:
        self._source = source
        self._layout = layout
        self.engine = source.engine
        self.version = source.version

    def _spec(self, spec: TensorSpec, item: TensorLayout | None) -> TensorSpec:
        if item is None or not item.transposed or len(spec.shape) != len(item.permutation):
            return spec
        return replace(spec, shape=tuple(spec.shape[axis] for axis in item.permutation))

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._spec(s, self._layout.input(s.name)) for s in self._source.inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._spec(s, self._layout.output(s.name)) for s in self._source.outputs)

    def run(self, feeds: Feeds) -> dict[str, Array]:
        results = self._source.run(self._layout.feed_to_source(feeds))
        return self._layout.outputs_to_artifact(results)
