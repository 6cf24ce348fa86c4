"""Which TFLite operator versions a device's runtime loads, and what blocks a model there.

A `.tflite` file lists its operator codes (builtin operator and version) in the `OperatorCode`
table of its flatbuffer. A runtime refuses a model when one of them is newer than the kernels
it was built with ("Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'").
`tflite_op_versions` reads those codes with a small self-contained flatbuffer reader (numpy
is not even needed, so this works on a device with any runtime or none), and `blocking_ops`
compares them with what the profile's oldest runtime loads.

The classic culprit is dynamic-range int8: TF >= 2.15 quantizes dense layers per channel, which
emits FULLY_CONNECTED version 12 (tflite-runtime 2.14 loads up to 10). `downgrade_options`
names the TFLiteConverter settings that keep such a model loadable on older runtimes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgekit.converters.compat import parse_version

from edgekit.errors import ConversionError
from edgekit.profiles import Profile, RuntimePin

__all__ = [
    "AI_EDGE_LITERT_1_2_MAX_VERSIONS",
    "BUILTIN_OPERATOR_NAMES",
    "TFLITE_RUNTIME_2_14_MAX_VERSIONS",
    "FlatbufferReader",
    "OperatorVersion",
    "TFLiteModelError",
    "UnmeasuredRuntimeError",
    "blocking_ops",
    "downgrade_options",
    "max_op_versions",
    "read_operator_codes",
    "tflite_op_versions",
]

_FILE_IDENTIFIER = b"TFL3"
# deprecated_builtin_code is an int8; operators numbered from here on live in builtin_code only.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127
_CUSTOM = 32
# What TF >= 2.15 emits for a dynamic-range dense layer with per-channel weights.
_PER_CHANNEL_DENSE_FC_VERSION = 12


class TFLiteModelError(ConversionError):
    """A file is not a readable TFLite flatbuffer."""


@dataclass(frozen=True)
class OperatorVersion:
    """One entry of a model's operator-code table: the operator and the version it needs.

    `name` is the builtin operator's schema name (`FULLY_CONNECTED`), or `CUSTOM:<code>` for a
    custom operator. The byte offsets locate the stored fields in the file (None when the
    field is absent and takes its schema default); tests use them to build probe models.
    """

    name: str
    builtin_code: int
    version: int
    custom_code: str | None = None
    builtin_code_offset: int | None = None
    deprecated_code_offset: int | None = None
    version_offset: int | None = None


# ---------------------------------------------------------------------------------------------
# A minimal flatbuffer reader: just enough for Model.operator_codes.


class _Buffer:
    def __init__(self, data: bytes, *, where: str) -> None:
        self.data = data
        self.where = where

    def fail(self, what: str) -> TFLiteModelError:
        return TFLiteModelError(
            f"{self.where}: not a valid TFLite model ({what}); convert it again or check that "
            "the file was copied whole"
        )

    def _unpack(self, fmt: str, offset: int) -> int:
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.data):
            raise self.fail(f"offset {offset} is outside the {len(self.data)}-byte file")
        value: int = struct.unpack_from(fmt, self.data, offset)[0]
        return value

    def u32(self, offset: int) -> int:
        return self._unpack("<I", offset)

    def i32(self, offset: int) -> int:
        return self._unpack("<i", offset)

    def u16(self, offset: int) -> int:
        return self._unpack("<H", offset)

    def i8(self, offset: int) -> int:
        return self._unpack("<b", offset)

    def field(self, table: int, index: int) -> int | None:
        """Absolute offset of field `index` of the table at `table`, or None when absent."""
        vtable = table - self.i32(table)
        vtable_bytes = self.u16(vtable)
        slot = 4 + 2 * index
        if slot + 2 > vtable_bytes:
            return None
        relative = self.u16(vtable + slot)
        return table + relative if relative else None

    def indirect(self, offset: int) -> int:
        return offset + self.u32(offset)

    def vector(self, offset: int) -> tuple[int, int]:
        """(start of the elements, element count) of the vector referenced at `offset`."""
        start = self.indirect(offset)
        count = self.u32(start)
        if start + 4 + 4 * count > len(self.data):
            raise self.fail(f"a vector of {count} entries runs past the end of the file")
        return start + 4, count

    def string(self, offset: int) -> str:
        start = self.indirect(offset)
        length = self.u32(start)
        raw = self.data[start + 4 : start + 4 + length]
        if len(raw) != length:
            raise self.fail("a string runs past the end of the file")
        return raw.decode("utf-8", errors="replace")


# Public name for the reader (the pruning pass walks tensors and buffers with it).
FlatbufferReader = _Buffer


def read_operator_codes(data: bytes, *, where: str = "<bytes>") -> list[OperatorVersion]:
    """The operator-code table of a TFLite flatbuffer, in file order."""
    buffer = _Buffer(data, where=where)
    if len(data) < 8:
        raise buffer.fail(f"only {len(data)} bytes")
    if data[4:8] != _FILE_IDENTIFIER:
        raise buffer.fail(f"file identifier {data[4:8]!r} is not {_FILE_IDENTIFIER!r}")
    model = buffer.u32(0)
    codes_field = buffer.field(model, 1)  # Model.operator_codes
    if codes_field is None:
        return []
    start, count = buffer.vector(codes_field)
    found = []
    for index in range(count):
        element = start + 4 * index
        table = buffer.indirect(element)
        deprecated_at = buffer.field(table, 0)  # deprecated_builtin_code: int8
        custom_at = buffer.field(table, 1)  # custom_code: string
        version_at = buffer.field(table, 2)  # version: int32 = 1
        builtin_at = buffer.field(table, 3)  # builtin_code: BuiltinOperator (int32) = ADD
        deprecated = buffer.i8(deprecated_at) if deprecated_at is not None else 0
        builtin = buffer.i32(builtin_at) if builtin_at is not None else 0
        version = buffer.i32(version_at) if version_at is not None else 1
        # As the runtime does (schema_utils GetBuiltinCode): the larger of the two fields.
        code = max(builtin, deprecated)
        custom = buffer.string(custom_at) if custom_at is not None else None
        name = f"CUSTOM:{custom or '?'}" if code == _CUSTOM else _operator_name(code)
        found.append(
            OperatorVersion(
                name=name,
                builtin_code=code,
                version=version,
                custom_code=custom,
                builtin_code_offset=builtin_at,
                deprecated_code_offset=deprecated_at,
                version_offset=version_at,
            )
        )
    return found


def _read_model(model: Path) -> bytes:
    try:
        return Path(model).read_bytes()
    except OSError as e:
        raise TFLiteModelError(f"cannot read TFLite model {model}: {e}") from e


def tflite_op_versions(model: Path) -> list[tuple[str, int]]:
    """(operator name, version) for every operator code of a `.tflite` file, in file order."""
    codes = read_operator_codes(_read_model(model), where=str(model))
    return [(code.name, code.version) for code in codes]


def _operator_name(code: int) -> str:
    if 0 <= code < len(BUILTIN_OPERATOR_NAMES):
        return BUILTIN_OPERATOR_NAMES[code]
    return f"BUILTIN_{code}"


# ---------------------------------------------------------------------------------------------
# What each runtime loads


def max_op_versions(pin: RuntimePin) -> Mapping[str, int] | None:
    """The newest version of each builtin operator `pin` loads; None when it loads whatever the
    converter edgekit uses (TF 2.21) emits.

    Operators missing from a returned table are unknown to that runtime altogether. Versions
    between measured releases get the table of the newest measured release not newer than
    them (a lower bound: it may refuse an operator the runtime has, never the reverse).
    Raises `UnmeasuredRuntimeError` for a release older than the oldest measured one.
    """
    version = parse_version(pin.version)
    if pin.package in ("tflite-runtime", "tensorflow"):
        # tflite-runtime's last release is 2.14 (measured); TF 2.14 ships the same kernels.
        _require_measured(pin, version, (2, 14), "2.14.0")
        if pin.package == "tensorflow" and version[:2] >= (2, 21):
            return None
        return TFLITE_RUNTIME_2_14_MAX_VERSIONS
    if pin.package == "ai-edge-litert":
        _require_measured(pin, version, (1, 2), "1.2.0")
        if version[:2] >= (2, 3):
            return None  # loads everything TF 2.21's converter emits (measured on 2.3.0)
        return AI_EDGE_LITERT_1_2_MAX_VERSIONS
    return None


class UnmeasuredRuntimeError(ConversionError):
    """No op-version table was measured for a runtime release this old."""


def _require_measured(
    pin: RuntimePin, version: tuple[int, ...], oldest: tuple[int, ...], oldest_label: str
) -> None:
    if version[: len(oldest)] < oldest:
        raise UnmeasuredRuntimeError(
            f"no measured op-version table for {pin.package} {pin.version}; the oldest "
            f"measured is {oldest_label}"
        )


def blocking_ops(model: Path, profile: Profile) -> list[str]:
    """Operators of `model` the profile's oldest runtime cannot load, one message each.

    Like "FULLY_CONNECTED version 12 (tflite-runtime 2.14.0 loads up to version 11)".
    Empty when the model loads there (as far as operator versions tell).
    """
    pin = profile.runtime.oldest
    try:
        table = max_op_versions(pin)
    except UnmeasuredRuntimeError as e:
        return [str(e)]  # fail closed: nothing says this runtime loads the model
    if table is None:
        return []
    runtime = f"{pin.package} {pin.version}"
    messages: list[str] = []
    seen: set[tuple[str, int]] = set()
    for code in read_operator_codes(_read_model(model), where=str(model)):
        if code.builtin_code == _CUSTOM or (code.name, code.version) in seen:
            continue
        seen.add((code.name, code.version))
        newest = table.get(code.name)
        if newest is None:
            messages.append(f"{code.name} version {code.version} ({runtime} has no {code.name})")
        elif code.version > newest:
            messages.append(
                f"{code.name} version {code.version} ({runtime} loads up to version {newest})"
            )
    return messages


def downgrade_options(profile: Profile) -> dict[str, object]:
    """TFLiteConverter attributes that keep operator versions loadable on the profile's oldest
    runtime; set them on the converter before `convert()` (empty: nothing to change).

    Dynamic-range quantization in TF >= 2.15 quantizes dense weights per channel, emitting
    FULLY_CONNECTED version 12, which tflite-runtime 2.14 refuses. Per-tensor dense weights
    give version 9, which it loads (measured: tests/converters/test_tflite_compat.py). Convolutions
    stay per channel (CONV_2D version 5 loads on 2.14). Validation then measures the accuracy
    cost like for any candidate; `blocking_ops` remains the final check.
    """
    try:
        table = max_op_versions(profile.runtime.oldest)
    except UnmeasuredRuntimeError:
        return {}  # `blocking_ops` refuses every model for it
    if table is None or table.get("FULLY_CONNECTED", 0) >= _PER_CHANNEL_DENSE_FC_VERSION:
        return {}
    return {"_experimental_disable_per_channel_quantization_for_dense_layers": True}


# The builtin operators of the TFLite schema (tensorflow/compiler/mlir/lite/schema/schema.fbs,
# TF 2.21), indexed by BuiltinOperator code.
# fmt: off
BUILTIN_OPERATOR_NAMES: tuple[str, ...] = (
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE",
    "DEQUANTIZE", "EMBEDDING_LOOKUP", "FLOOR", "FULLY_CONNECTED", "HASHTABLE_LOOKUP",
    "L2_NORMALIZATION", "L2_POOL_2D", "LOCAL_RESPONSE_NORMALIZATION", "LOGISTIC", "LSH_PROJECTION",
    "LSTM", "MAX_POOL_2D", "MUL", "RELU", "RELU_N1_TO_1", "RELU6", "RESHAPE", "RESIZE_BILINEAR",
    "RNN", "SOFTMAX", "SPACE_TO_DEPTH", "SVDF", "TANH", "CONCAT_EMBEDDINGS", "SKIP_GRAM", "CALL",
    "CUSTOM", "EMBEDDING_LOOKUP_SPARSE", "PAD", "UNIDIRECTIONAL_SEQUENCE_RNN", "GATHER",
    "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "TRANSPOSE", "MEAN", "SUB", "DIV", "SQUEEZE",
    "UNIDIRECTIONAL_SEQUENCE_LSTM", "STRIDED_SLICE", "BIDIRECTIONAL_SEQUENCE_RNN", "EXP",
    "TOPK_V2", "SPLIT", "LOG_SOFTMAX", "DELEGATE", "BIDIRECTIONAL_SEQUENCE_LSTM", "CAST", "PRELU",
    "MAXIMUM", "ARG_MAX", "MINIMUM", "LESS", "NEG", "PADV2", "GREATER", "GREATER_EQUAL",
    "LESS_EQUAL", "SELECT", "SLICE", "SIN", "TRANSPOSE_CONV", "SPARSE_TO_DENSE", "TILE",
    "EXPAND_DIMS", "EQUAL", "NOT_EQUAL", "LOG", "SUM", "SQRT", "RSQRT", "SHAPE", "POW", "ARG_MIN",
    "FAKE_QUANT", "REDUCE_PROD", "REDUCE_MAX", "PACK", "LOGICAL_OR", "ONE_HOT", "LOGICAL_AND",
    "LOGICAL_NOT", "UNPACK", "REDUCE_MIN", "FLOOR_DIV", "REDUCE_ANY", "SQUARE", "ZEROS_LIKE",
    "FILL", "FLOOR_MOD", "RANGE", "RESIZE_NEAREST_NEIGHBOR", "LEAKY_RELU", "SQUARED_DIFFERENCE",
    "MIRROR_PAD", "ABS", "SPLIT_V", "UNIQUE", "CEIL", "REVERSE_V2", "ADD_N", "GATHER_ND", "COS",
    "WHERE", "RANK", "ELU", "REVERSE_SEQUENCE", "MATRIX_DIAG", "QUANTIZE", "MATRIX_SET_DIAG",
    "ROUND", "HARD_SWISH", "IF", "WHILE", "NON_MAX_SUPPRESSION_V4", "NON_MAX_SUPPRESSION_V5",
    "SCATTER_ND", "SELECT_V2", "DENSIFY", "SEGMENT_SUM", "BATCH_MATMUL",
    "PLACEHOLDER_FOR_GREATER_OP_CODES", "CUMSUM", "CALL_ONCE", "BROADCAST_TO", "RFFT2D", "CONV_3D",
    "IMAG", "REAL", "COMPLEX_ABS", "HASHTABLE", "HASHTABLE_FIND", "HASHTABLE_IMPORT",
    "HASHTABLE_SIZE", "REDUCE_ALL", "CONV_3D_TRANSPOSE", "VAR_HANDLE", "READ_VARIABLE",
    "ASSIGN_VARIABLE", "BROADCAST_ARGS", "RANDOM_STANDARD_NORMAL", "BUCKETIZE", "RANDOM_UNIFORM",
    "MULTINOMIAL", "GELU", "DYNAMIC_UPDATE_SLICE", "RELU_0_TO_1", "UNSORTED_SEGMENT_PROD",
    "UNSORTED_SEGMENT_MAX", "UNSORTED_SEGMENT_SUM", "ATAN2", "UNSORTED_SEGMENT_MIN", "SIGN",
    "BITCAST", "BITWISE_XOR", "RIGHT_SHIFT", "STABLEHLO_LOGISTIC", "STABLEHLO_ADD",
    "STABLEHLO_DIVIDE", "STABLEHLO_MULTIPLY", "STABLEHLO_MAXIMUM", "STABLEHLO_RESHAPE",
    "STABLEHLO_CLAMP", "STABLEHLO_CONCATENATE", "STABLEHLO_BROADCAST_IN_DIM",
    "STABLEHLO_CONVOLUTION", "STABLEHLO_SLICE", "STABLEHLO_CUSTOM_CALL", "STABLEHLO_REDUCE",
    "STABLEHLO_ABS", "STABLEHLO_AND", "STABLEHLO_COSINE", "STABLEHLO_EXPONENTIAL",
    "STABLEHLO_FLOOR", "STABLEHLO_LOG", "STABLEHLO_MINIMUM", "STABLEHLO_NEGATE", "STABLEHLO_OR",
    "STABLEHLO_POWER", "STABLEHLO_REMAINDER", "STABLEHLO_RSQRT", "STABLEHLO_SELECT",
    "STABLEHLO_SUBTRACT", "STABLEHLO_TANH", "STABLEHLO_SCATTER", "STABLEHLO_COMPARE",
    "STABLEHLO_CONVERT", "STABLEHLO_DYNAMIC_SLICE", "STABLEHLO_DYNAMIC_UPDATE_SLICE",
    "STABLEHLO_PAD", "STABLEHLO_IOTA", "STABLEHLO_DOT_GENERAL", "STABLEHLO_REDUCE_WINDOW",
    "STABLEHLO_SORT", "STABLEHLO_WHILE", "STABLEHLO_GATHER", "STABLEHLO_TRANSPOSE", "DILATE",
    "STABLEHLO_RNG_BIT_GENERATOR", "REDUCE_WINDOW", "STABLEHLO_COMPOSITE", "STABLEHLO_SHIFT_LEFT",
    "STABLEHLO_CBRT", "STABLEHLO_CASE",
)
# fmt: on

# Newest version of each builtin operator that tflite-runtime 2.14.0 loads. Source: the
# BuiltinOpResolver of TF v2.14.0 (tensorflow/lite/core/kernels/register.cc, AddBuiltin
# min/max versions), as compiled into the tflite-runtime 2.14.0 wheel (cp311 manylinux2014
# x86_64): measured by loading a model holding each builtin code at versions 1-20 and noting
# which ones the wheel's resolver finds ("Didn't find op for builtin opcode ..." otherwise).
# tests/converters/test_tflite_compat_table.py repeats the measurement against the real wheel.
# Operators absent here do not exist in 2.14. BROADCAST_TO starts at version 2.
# fmt: off
TFLITE_RUNTIME_2_14_MAX_VERSIONS: Mapping[str, int] = {
    "ADD": 5, "AVERAGE_POOL_2D": 3, "CONCATENATION": 4, "CONV_2D": 7, "DEPTHWISE_CONV_2D": 7,
    "DEPTH_TO_SPACE": 2, "DEQUANTIZE": 5, "EMBEDDING_LOOKUP": 3, "FLOOR": 1, "FULLY_CONNECTED": 10,
    "HASHTABLE_LOOKUP": 1, "L2_NORMALIZATION": 2, "L2_POOL_2D": 1,
    "LOCAL_RESPONSE_NORMALIZATION": 1, "LOGISTIC": 3, "LSH_PROJECTION": 1, "LSTM": 4,
    "MAX_POOL_2D": 3, "MUL": 7, "RELU": 3, "RELU_N1_TO_1": 1, "RELU6": 3, "RESHAPE": 1,
    "RESIZE_BILINEAR": 4, "RNN": 3, "SOFTMAX": 3, "SPACE_TO_DEPTH": 2, "SVDF": 4, "TANH": 3,
    "SKIP_GRAM": 1, "EMBEDDING_LOOKUP_SPARSE": 1, "PAD": 4, "UNIDIRECTIONAL_SEQUENCE_RNN": 3,
    "GATHER": 6, "BATCH_TO_SPACE_ND": 4, "SPACE_TO_BATCH_ND": 4, "TRANSPOSE": 6, "MEAN": 3,
    "SUB": 5, "DIV": 2, "SQUEEZE": 2, "UNIDIRECTIONAL_SEQUENCE_LSTM": 4, "STRIDED_SLICE": 8,
    "BIDIRECTIONAL_SEQUENCE_RNN": 3, "EXP": 2, "TOPK_V2": 3, "SPLIT": 4, "LOG_SOFTMAX": 2,
    "BIDIRECTIONAL_SEQUENCE_LSTM": 3, "CAST": 5, "PRELU": 1, "MAXIMUM": 4, "ARG_MAX": 3,
    "MINIMUM": 4, "LESS": 3, "NEG": 1, "PADV2": 4, "GREATER": 2, "GREATER_EQUAL": 3,
    "LESS_EQUAL": 2, "SELECT": 4, "SLICE": 6, "SIN": 1, "TRANSPOSE_CONV": 4, "SPARSE_TO_DENSE": 3,
    "TILE": 3, "EXPAND_DIMS": 1, "EQUAL": 4, "NOT_EQUAL": 3, "LOG": 1, "SUM": 2, "SQRT": 1,
    "RSQRT": 2, "SHAPE": 1, "POW": 1, "ARG_MIN": 3, "FAKE_QUANT": 2, "REDUCE_PROD": 2,
    "REDUCE_MAX": 3, "PACK": 4, "LOGICAL_OR": 1, "ONE_HOT": 1, "LOGICAL_AND": 1, "LOGICAL_NOT": 1,
    "UNPACK": 4, "REDUCE_MIN": 3, "FLOOR_DIV": 3, "REDUCE_ANY": 1, "SQUARE": 1, "ZEROS_LIKE": 1,
    "FILL": 4, "FLOOR_MOD": 2, "RANGE": 2, "RESIZE_NEAREST_NEIGHBOR": 4, "LEAKY_RELU": 2,
    "SQUARED_DIFFERENCE": 2, "MIRROR_PAD": 3, "ABS": 5, "SPLIT_V": 2, "UNIQUE": 1, "CEIL": 1,
    "REVERSE_V2": 3, "ADD_N": 1, "GATHER_ND": 4, "COS": 1, "WHERE": 2, "RANK": 1, "ELU": 1,
    "REVERSE_SEQUENCE": 1, "MATRIX_DIAG": 1, "QUANTIZE": 3, "MATRIX_SET_DIAG": 1, "ROUND": 1,
    "HARD_SWISH": 1, "IF": 1, "WHILE": 1, "NON_MAX_SUPPRESSION_V4": 1, "NON_MAX_SUPPRESSION_V5": 1,
    "SCATTER_ND": 1, "SELECT_V2": 2, "DENSIFY": 1, "SEGMENT_SUM": 1, "BATCH_MATMUL": 4,
    "CUMSUM": 1, "CALL_ONCE": 1, "BROADCAST_TO": 3, "RFFT2D": 1, "CONV_3D": 1, "IMAG": 1,
    "REAL": 1, "COMPLEX_ABS": 1, "HASHTABLE": 1, "HASHTABLE_FIND": 1, "HASHTABLE_IMPORT": 1,
    "HASHTABLE_SIZE": 1, "REDUCE_ALL": 1, "CONV_3D_TRANSPOSE": 1, "VAR_HANDLE": 1,
    "READ_VARIABLE": 1, "ASSIGN_VARIABLE": 1, "BROADCAST_ARGS": 1, "RANDOM_STANDARD_NORMAL": 1,
    "BUCKETIZE": 1, "RANDOM_UNIFORM": 1, "MULTINOMIAL": 1, "GELU": 2, "DYNAMIC_UPDATE_SLICE": 1,
    "RELU_0_TO_1": 1, "UNSORTED_SEGMENT_PROD": 1, "UNSORTED_SEGMENT_MAX": 1,
    "UNSORTED_SEGMENT_SUM": 1, "ATAN2": 1, "UNSORTED_SEGMENT_MIN": 1, "SIGN": 2, "BITCAST": 1,
    "BITWISE_XOR": 1, "RIGHT_SHIFT": 1,
}
# fmt: on

# ai-edge-litert 1.2.0 (cp311 manylinux x86_64 wheel), measured the same way: what it loads
# beyond tflite-runtime 2.14. TF 2.21 can emit newer versions than this (e.g. QUANTIZE,
# CONCATENATION and SOFTMAX for int16 activations; ai-edge-litert 2.3 loads them).
# fmt: off
AI_EDGE_LITERT_1_2_MAX_VERSIONS: Mapping[str, int] = {
    **TFLITE_RUNTIME_2_14_MAX_VERSIONS,
    "CONV_2D": 8, "DEQUANTIZE": 6, "EMBEDDING_LOOKUP": 4, "FULLY_CONNECTED": 13, "GATHER": 7,
    "TRANSPOSE": 7, "CAST": 7, "TRANSPOSE_CONV": 5, "LOG": 2, "RSQRT": 3, "GATHER_ND": 5,
    "DYNAMIC_UPDATE_SLICE": 3, "STABLEHLO_ADD": 1, "STABLEHLO_MULTIPLY": 1, "STABLEHLO_MAXIMUM": 1,
    "STABLEHLO_AND": 1, "STABLEHLO_MINIMUM": 1, "STABLEHLO_SCATTER": 1, "STABLEHLO_PAD": 1,
    "STABLEHLO_REDUCE_WINDOW": 1, "STABLEHLO_GATHER": 1, "DILATE": 1,
    "STABLEHLO_RNG_BIT_GENERATOR": 1, "REDUCE_WINDOW": 1, "STABLEHLO_COMPOSITE": 1,
    "STABLEHLO_SHIFT_LEFT": 1, "STABLEHLO_CASE": 1,
}
# fmt: on
