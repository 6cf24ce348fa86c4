"""Tiny fully quantized TFLite classifiers (int8 or uint8 I/O), built here with TensorFlow, and
their golden samples written by the converter's own golden writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from edgekit.converters.data import Dataset
from edgekit.converters.outputs import write_golden as _write_golden

from edgekit.profiles import load_profile
from edgekit.runtimes import LiteRtBackend

Array = npt.NDArray[Any]
FEATURES = 16
CLASSES = 10


def _features(count: int, seed: int) -> Array:
    return np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)


def quantized_classifier(folder: Path, io_type: Literal["int8", "uint8"]) -> Path:
    """`folder/model.tflite`: Dense-ReLU-Dense with 10 logits, full int8, `io_type` I/O."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((FEATURES,), name="features"),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(CLASSES),
        ]
    )
    calibration = _features(200, seed=1)

    def representative() -> Any:
        for row in calibration:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    dtype = tf.uint8 if io_type == "uint8" else tf.int8
    converter.inference_input_type = dtype
    converter.inference_output_type = dtype
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.tflite"
    path.write_bytes(converter.convert())
    return path


def write_golden(model: Path, profile: str, *, samples: int = 4, rows: int = 8) -> Path:
    """`golden.npz` beside `model`, written by the converter's `_write_golden`."""
    runtime = LiteRtBackend(model)
    (spec,) = runtime.inputs
    feeds = tuple({spec.name: _features(rows, seed=10 + i)} for i in range(samples))
    dataset = Dataset(feeds=feeds, source="test", kind="file", samples=samples * rows)
    path = model.with_name("golden.npz")
    _write_golden(path, runtime, dataset, load_profile(profile))
    return path
