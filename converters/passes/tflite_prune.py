"""Magnitude pruning of a TFLite model's weights, in the flatbuffer itself.

Any TFLite candidate (fp32, fp16, dynamic-range or full int8; from TFLiteConverter, the LiteRT
quantizer, litert-torch or onnx2tf) can be pruned: the weight tensors of CONV_2D,
DEPTHWISE_CONV_2D, CONV_3D, TRANSPOSE_CONV, FULLY_CONNECTED and BATCH_MATMUL (followed through
a DEQUANTIZE, as fp16 models store them) have the smallest-magnitude fraction of their values
set to zero, per tensor, as the ONNX `prune` pass does. Quantized weights are judged by their
real value, scale * (q - zero_point), per channel, and pruned to their zero point.

The bytes are overwritten in place, so the model keeps its exact structure, op versions and
size; what pruning buys is a smaller compressed bundle (zstd over runs of zeros), which the
report shows as `compressed_size_bytes`. Dense CPU kernels run no faster on zeros. The accuracy
guard is the pipeline's validation: a pruned candidate outside the tolerance is not chosen.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.passes.base import Pass, PassContext, PassResult, configure
from edgekit.converters.tflite_compat import (
    FlatbufferReader,
    TFLiteModelError,
    read_operator_codes,
)

from edgekit.errors import ConversionError
from edgekit.profiles import Profile

__all__ = [
    "PrunedTensor",
    "TflitePruneConfig",
    "TflitePrunePass",
    "magnitude_mask",
    "prune_tflite",
    "weight_sparsity",
    "weight_tensors",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

# Operator name -> index of its weight input.
_WEIGHT_INPUT = {
    "CONV_2D": 1,
    "DEPTHWISE_CONV_2D": 1,
    "CONV_3D": 1,
    "FULLY_CONNECTED": 1,
    "TRANSPOSE_CONV": 1,
    "BATCH_MATMUL": 1,
}
# TensorType -> numpy dtype of the stored values (the types weights come in).
_TENSOR_TYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    9: np.dtype("i1"),
    3: np.dtype("u1"),
}


def magnitude_mask(magnitudes: Array, sparsity: float) -> Array:
    """True for the `sparsity` fraction of entries with the smallest magnitude (ties included)."""
    flat = np.abs(np.asarray(magnitudes, dtype=np.float64)).ravel()
    count = int(flat.size * sparsity)
    if count == 0:
        return np.zeros(np.shape(magnitudes), dtype=bool)
    threshold = np.partition(flat, count - 1)[count - 1]
    mask: Array = np.abs(magnitudes) <= threshold
    return mask


@dataclass(frozen=True)
class PrunedTensor:
    """One weight tensor: where its bytes are and how it is stored."""

    name: str
    operator: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    data_offset: int  # of the first value in the file
    scales: tuple[float, ...]  # empty for float tensors
    zero_points: tuple[int, ...]
    quantized_dimension: int

    @property
    def elements(self) -> int:
        """How many values the tensor holds."""
        return math.prod(self.shape)

    def read(self, content: bytes | bytearray) -> Array:
        """The stored values, shaped."""
        count = self.elements
        values = np.frombuffer(content, dtype=self.dtype, count=count, offset=self.data_offset)
        return values.reshape(self.shape)

    def real(self, stored: Array) -> Array:
        """Real values: stored floats, or scale * (q - zero_point) per channel."""
        if not self.scales:
            return stored.astype(np.float64)
        broadcast = [1] * len(self.shape)
        axis = self.quantized_dimension if len(self.scales) > 1 else 0
        if len(self.scales) > 1:
            broadcast[axis] = -1
        scales = np.asarray(self.scales, dtype=np.float64).reshape(broadcast)
        zeros = np.asarray(self.zero_points or (0,), dtype=np.float64).reshape(
            broadcast if len(self.zero_points) > 1 else [1] * len(self.shape)
        )
        real: Array = (stored.astype(np.float64) - zeros) * scales
        return real

    def zero(self) -> Array:
        """The stored value(s) meaning 0.0, broadcastable to the tensor."""
        if not self.scales or not self.zero_points:
            return np.zeros(1, dtype=self.dtype)
        if len(self.zero_points) > 1:
            broadcast = [1] * len(self.shape)
            broadcast[self.quantized_dimension] = -1
            values: Array = np.asarray(self.zero_points).astype(self.dtype).reshape(broadcast)
            return values
        return np.asarray(self.zero_points[:1]).astype(self.dtype)


def _vector(reader: FlatbufferReader, field: int, item_bytes: int) -> tuple[int, int]:
    """(start, count) of a vector of `item_bytes`-sized scalars, bounds-checked."""
    start = reader.indirect(field)
    count = reader.u32(start)
    if start + 4 + item_bytes * count > len(reader.data):
        raise reader.fail(f"a vector of {count} entries runs past the end of the file")
    return start + 4, count


def _scalars(reader: FlatbufferReader, field: int | None, fmt: str) -> tuple[Any, ...]:
    if field is None:
        return ()
    start, count = _vector(reader, field, struct.calcsize(fmt))
    return struct.unpack_from(f"<{count}{fmt}", reader.data, start)


def weight_tensors(content: bytes, *, where: str = "<bytes>") -> list[PrunedTensor]:
    """The weight tensors of every subgraph whose values live in the file (each once); a file
    that is not a well-formed TFLite model raises `TFLiteModelError`."""
    try:
        return list(_weight_tensors(content, where=where))
    except (struct.error, IndexError, ValueError, OverflowError) as e:
        raise TFLiteModelError(
            f"{where}: not a valid TFLite model ({e}); convert it again or check that the file "
            "was copied whole"
        ) from e


def _weight_tensors(content: bytes, *, where: str) -> Iterator[PrunedTensor]:
    reader = FlatbufferReader(content, where=where)
    operators = [code.name for code in read_operator_codes(content, where=where)]
    model = reader.u32(0)
    subgraphs_field = reader.field(model, 2)
    buffers_field = reader.field(model, 4)
    if subgraphs_field is None or buffers_field is None:
        return
    buffers_start, buffer_count = reader.vector(buffers_field)
    sub_start, sub_count = reader.vector(subgraphs_field)
    seen: set[tuple[int, int]] = set()
    for sub_index in range(sub_count):
        subgraph = reader.indirect(sub_start + 4 * sub_index)
        tensors_field = reader.field(subgraph, 0)
        operators_field = reader.field(subgraph, 3)
        if tensors_field is None or operators_field is None:
            continue
        tensors_start, tensor_count = reader.vector(tensors_field)
        ops_start, op_count = reader.vector(operators_field)
        ops = []
        for op_index in range(op_count):
            op = reader.indirect(ops_start + 4 * op_index)
            code_at = reader.field(op, 0)
            code = reader.u32(code_at) if code_at is not None else 0
            name = operators[code] if code < len(operators) else "?"
            inputs = _scalars(reader, reader.field(op, 1), "i")
            outputs = _scalars(reader, reader.field(op, 2), "i")
            ops.append((name, inputs, outputs))
        producer = {out: (name, inputs) for name, inputs, outputs in ops for out in outputs}
        for name, inputs, _ in ops:
            slot = _WEIGHT_INPUT.get(name)
            if slot is None or slot >= len(inputs) or inputs[slot] < 0:
                continue
            tensor_index = inputs[slot]
            made_by = producer.get(tensor_index)
            if made_by is not None and made_by[0] == "DEQUANTIZE" and made_by[1]:
                tensor_index = made_by[1][0]  # fp16 or weight-only: the stored constant
            if not 0 <= tensor_index < tensor_count or (sub_index, tensor_index) in seen:
                continue
            found = _constant(
                reader,
                reader.indirect(tensors_start + 4 * tensor_index),
                buffers_start,
                buffer_count,
                name,
            )
            if found is not None:
                seen.add((sub_index, tensor_index))
                yield found


def _constant(
    reader: FlatbufferReader,
    tensor: int,
    buffers_start: int,
    buffer_count: int,
    operator: str,
) -> PrunedTensor | None:
    shape = tuple(int(d) for d in _scalars(reader, reader.field(tensor, 0), "i"))
    type_at = reader.field(tensor, 1)
    tensor_type = reader.data[type_at] if type_at is not None else 0
    dtype = _TENSOR_TYPES.get(tensor_type)
    buffer_at = reader.field(tensor, 2)
    buffer_index = reader.u32(buffer_at) if buffer_at is not None else 0
    if dtype is None or buffer_index == 0 or buffer_index >= buffer_count or not shape:
        return None
    name_at = reader.field(tensor, 3)
    name = reader.string(name_at) if name_at is not None else f"tensor_{tensor}"
    buffer = reader.indirect(buffers_start + 4 * buffer_index)
    elements = math.prod(shape)
    data_at = reader.field(buffer, 0)
    offset_at = reader.field(buffer, 1)
    if data_at is not None:
        start, length = _vector(reader, data_at, 1)
    elif offset_at is not None:  # large models keep buffers after the flatbuffer
        start = struct.unpack_from("<Q", reader.data, offset_at)[0]
        size_at = reader.field(buffer, 2)
        length = struct.unpack_from("<Q", reader.data, size_at)[0] if size_at else 0
    else:
        return None
    if length != elements * dtype.itemsize or start + length > len(reader.data):
        return None
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension = 0
    quantization = reader.field(tensor, 4)
    if quantization is not None:
        table = reader.indirect(quantization)
        scales = tuple(float(s) for s in _scalars(reader, reader.field(table, 2), "f"))
        zero_points = tuple(int(z) for z in _scalars(reader, reader.field(table, 3), "q"))
        dimension_at = reader.field(table, 6)
        quantized_dimension = reader.i32(dimension_at) if dimension_at is not None else 0
    if dtype.kind in "iu" and not scales:
        return None  # integer data without scales is not a weight we can judge
    return PrunedTensor(
        name=name,
        operator=operator,
        dtype=dtype,
        shape=shape,
        data_offset=start,
        scales=scales,
        zero_points=zero_points,
        quantized_dimension=quantized_dimension,
    )


def prune_tflite(
    content: bytes, *, sparsity: float, min_elements: int = 1024, where: str = "<bytes>"
) -> tuple[bytes, dict[str, Any]]:
    """`content` with the smallest-magnitude `sparsity` of each weight tensor of at least
    `min_elements` values set to zero; returns the model and what was pruned."""
    if not 0.0 < sparsity < 1.0:
        raise ConversionError(f"pruning sparsity must be in (0, 1), got {sparsity}")
    pruned = bytearray(content)
    zeroed = 0
    total = 0
    tensors = []
    for tensor in weight_tensors(content, where=where):
        if tensor.elements < min_elements:
            continue
        stored = tensor.read(content)
        mask = magnitude_mask(tensor.real(stored), sparsity)
        values = np.where(mask, tensor.zero(), stored).astype(tensor.dtype)
        end = tensor.data_offset + values.nbytes
        pruned[tensor.data_offset : end] = values.tobytes()
        zeroed += int(mask.sum())
        total += tensor.elements
        tensors.append(
            {
                "tensor": tensor.name,
                "operator": tensor.operator,
                "dtype": str(tensor.dtype),
                "elements": tensor.elements,
                "zeroed": int(mask.sum()),
            }
        )
    if total == 0:
        raise ConversionError(
            f"{where}: no weight tensor of {min_elements} or more values to prune"
        )
    return bytes(pruned), {
        "sparsity": zeroed / total,
        "weights_pruned": zeroed,
        "weights_considered": total,
        "tensors": tensors,
    }


def weight_sparsity(content: bytes, *, min_elements: int = 0) -> float:
    """The fraction of weight values (of tensors of at least `min_elements`) that are zero."""
    zeros = 0
    total = 0
    for tensor in weight_tensors(content):
        if tensor.elements < min_elements:
            continue
        zeros += int(np.count_nonzero(tensor.real(tensor.read(content)) == 0.0))
        total += tensor.elements
    return zeros / total if total else 0.0


@dataclass(frozen=True)
class TflitePruneConfig:
    """The profile's `pruning` section: fraction of weights set to zero, smallest tensor."""

    sparsity: float = 0.5
    min_elements: int = 1024


class TflitePrunePass(Pass):
    """A `.tflite` file in, the same model with magnitude-pruned weights out."""

    name = "tflite_prune"

    def __init__(self, config: TflitePruneConfig | None = None) -> None:
        self.config = config or TflitePruneConfig()

    @classmethod
    def config_for(cls, profile: Profile, **options: Any) -> TflitePruneConfig:
        defaults = TflitePruneConfig(
            sparsity=profile.pruning.sparsity or 0.5,
            min_elements=profile.pruning.min_tensor_elements,
        )
        return configure(defaults, options, cls.name)

    def run(self, source: Path, destination: Path, context: PassContext) -> PassResult:
        try:
            content = source.read_bytes()
        except OSError as e:
            raise ConversionError(f"cannot read {source}: {e}") from e
        pruned, details = prune_tflite(
            content,
            sparsity=self.config.sparsity,
            min_elements=self.config.min_elements,
            where=str(source),
        )
        destination.write_bytes(pruned)
        return PassResult(details=details)
