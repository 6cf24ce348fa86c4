"""What each onnxruntime release loads: the newest ONNX IR version and opsets it implements.

From onnxruntime's versioning table (docs/Versioning.md). A release newer than the table is
assumed to load at least what the newest listed release loads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OnnxLimits", "onnx_limits_for_onnxruntime", "parse_version"]


@dataclass(frozen=True)
class OnnxLimits:
    """The newest ONNX IR version and operator-set versions one runtime release loads."""

    runtime_version: str
    max_ir_version: int
    max_opset: int  # default domain (ai.onnx)
    max_ml_opset: int  # ai.onnx.ml


# (major, minor) -> (IR version, ai.onnx opset, ai.onnx.ml opset)
_ONNXRUNTIME_TABLE: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, 10): (8, 15, 2),
    (1, 11): (8, 16, 2),
    (1, 12): (8, 17, 3),
    (1, 13): (8, 17, 3),
    (1, 14): (8, 18, 3),
    (1, 15): (9, 19, 3),
    (1, 16): (9, 19, 3),
    (1, 17): (9, 20, 4),
    (1, 18): (10, 21, 5),
    (1, 19): (10, 21, 5),
    (1, 20): (10, 21, 5),
    (1, 21): (10, 22, 5),
    (1, 22): (11, 22, 5),
    (1, 23): (11, 23, 5),
}


def parse_version(text: str) -> tuple[int, ...]:
    """'1.16.3' -> (1, 16, 3); non-numeric suffixes ('1.17.0rc1') are dropped."""
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def onnx_limits_for_onnxruntime(version: str) -> OnnxLimits:
    """The ONNX limits of an onnxruntime release (e.g. 1.16.3 loads IR <= 9, opset <= 19)."""
    key = parse_version(version)[:2]
    known = sorted(_ONNXRUNTIME_TABLE)
    if key < known[0]:
        raise ValueError(
            f"onnxruntime {version} is older than edgekit supports (oldest: "
            f"{known[0][0]}.{known[0][1]})"
        )
    usable = [release for release in known if release <= key]
    ir_version, opset, ml_opset = _ONNXRUNTIME_TABLE[usable[-1]]
    return OnnxLimits(
        runtime_version=version,
        max_ir_version=ir_version,
        max_opset=opset,
        max_ml_opset=ml_opset,
    )
