"""A small Keras model trained here, for TFLite tests, benchmarks and the docs.

`export_keras_digits` trains a Keras CNN on scikit-learn's bundled 8x8 digits (NHWC, nothing
downloaded, a few seconds on a laptop) and writes it as a `.keras` file and as a SavedModel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from edgekit.converters.examples import load_digits_split

__all__ = ["KerasDigitsExample", "export_keras_digits"]

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class KerasDigitsExample:
    """The trained model in both TensorFlow formats, its data, and its own test outputs."""

    keras_path: Path
    saved_model: Path
    calibration_path: Path  # .npz, `pixels`: float32 [128, 8, 8, 1]
    validation_path: Path  # .npz, the held-out split
    x_test: Array  # float32 [N, 8, 8, 1] in [0, 1]
    y_test: Array
    logits_test: Array  # the Keras model's own outputs on x_test
    test_accuracy: float


def export_keras_digits(folder: Path, *, epochs: int = 6, seed: int = 0) -> KerasDigitsExample:
    """Train Conv-Conv-MaxPool-Dense-Dense on the digits; save `.keras`, SavedModel and data."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    x_train = np.ascontiguousarray(x_train.transpose(0, 2, 3, 1))  # NCHW -> NHWC for Keras
    x_test = np.ascontiguousarray(x_test.transpose(0, 2, 3, 1))
    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1), name="pixels"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, name="logits"),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    logits = np.asarray(model.predict(x_test, verbose=0))
    model.save(folder / "digits.keras")
    model.export(str(folder / "saved_model"), verbose=False)
    np.savez(folder / "calibration.npz", pixels=x_train[:128])
    np.savez(folder / "validation.npz", pixels=x_test)
    return KerasDigitsExample(
        keras_path=folder / "digits.keras",
        saved_model=folder / "saved_model",
        calibration_path=folder / "calibration.npz",
        validation_path=folder / "validation.npz",
        x_test=x_test,
        y_test=y_test,
        logits_test=logits,
        test_accuracy=float((logits.argmax(1) == y_test).mean()),
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m edgekit.converters.tflite_examples [OUTDIR]`: write the Keras digits example."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m edgekit.converters.tflite_examples",
        description="Train a Keras digits CNN on scikit-learn's bundled digits and write "
        "digits.keras, saved_model/, calibration.npz and validation.npz to OUTDIR.",
    )
    parser.add_argument("outdir", nargs="?", default="example-keras", type=Path)
    outdir = parser.parse_args(argv).outdir
    from edgekit.quiet import native_output

    with native_output():  # TensorFlow's start-up lines are not this command's output
        example = export_keras_digits(outdir)
    sys.stdout.write(
        f"wrote {example.keras_path} (test accuracy {example.test_accuracy:.3f}), "
        f"{example.saved_model}, {example.calibration_path}, {example.validation_path}\n"
    )


if __name__ == "__main__":
    main()
