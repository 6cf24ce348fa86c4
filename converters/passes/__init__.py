"""Conversion passes, registered by name (see `base.Pass`)."""

from edgekit.converters.passes import onnx_passes as onnx_passes
from edgekit.converters.passes import tflite_passes as tflite_passes
from edgekit.converters.passes import tflite_prune as tflite_prune
from edgekit.converters.passes.base import (
    Pass,
    PassContext,
    PassResult,
    get_pass,
    registered_passes,
)

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "get_pass",
    "onnx_passes",
    "registered_passes",
    "tflite_passes",
    "tflite_prune",
]
