"""Shared fixtures: example models and data built here, nothing downloaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from edgekit.converters.examples import (
    DigitsExample,
    export_digits_cnn,
    machine_files,
    magika_inputs,
    silero_stream,
)

from edgekit.mosquitto import MosquittoBroker

# The third-party models live beside the checkout (../shared/models) unless
# EDGEKIT_SHARED_MODELS names another folder.
SHARED_MODELS = Path(
    os.environ.get(
        "EDGEKIT_SHARED_MODELS", Path(__file__).resolve().parents[1].parent / "shared" / "models"
    )
)
MAGIKA = SHARED_MODELS / "magika-standard-v3.3" / "model.onnx"
SILERO = SHARED_MODELS / "silero-vad-16k-op15" / "model.onnx"


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsExample:
    """The digits CNN, trained here with numpy on scikit-learn's bundled digits."""
    return export_digits_cnn(tmp_path_factory.mktemp("digits"))


def require_shared(model: Path) -> None:
    if not model.exists():
        pytest.fail(
            f"shared model missing: {model}; clone edgekit beside shared/ or set "
            "EDGEKIT_SHARED_MODELS to the folder holding the shared models"
        )


@pytest.fixture(scope="session")
def magika_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Calibration and validation .npz for magika from real files on this machine."""
    require_shared(MAGIKA)
    x = magika_inputs(machine_files())
    assert len(x) > 100, "too few readable files for magika data"
    order = np.random.default_rng(0).permutation(len(x))
    folder = tmp_path_factory.mktemp("magika")
    np.savez(folder / "calibration.npz", bytes=x[order[:96]])
    np.savez(folder / "validation.npz", bytes=x[order[96:256]])
    return folder / "calibration.npz", folder / "validation.npz"


@pytest.fixture(scope="session")
def silero_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_shared(SILERO)
    """Streaming chunks (speech-like tones, noise, silence) with the states they lead to."""
    stream = silero_stream(SILERO, chunks=96)
    folder = tmp_path_factory.mktemp("silero")
    calibration = {k: v[0::2] if v.ndim else v for k, v in stream.items()}
    validation = {k: v[1::2] if v.ndim else v for k, v in stream.items()}
    np.savez(folder / "calibration.npz", **calibration)
    np.savez(folder / "validation.npz", **validation)
    return folder / "calibration.npz", folder / "validation.npz"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, anonymous access, stopped after the test."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where verify-runtime's venvs live for this session; EDGEKIT_RUNTIME_CACHE names a
    persistent folder instead (the venvs are then built once across sessions)."""
    persistent = os.environ.get("EDGEKIT_RUNTIME_CACHE")
    if persistent:
        return Path(persistent)
    return tmp_path_factory.getbasetemp() / "edgekit-runtimes"
