"""Calibration/validation data: formats, feeds, and clear errors for data that does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgekit.converters.data import load_dataset, synthetic_dataset
from PIL import Image

from edgekit.errors import InputDataError
from edgekit.runtimes import TensorSpec

IMAGE = TensorSpec("pixels", "float32", ("batch", 1, 8, 8))
SILERO_LIKE = (
    TensorSpec("input", "float32", ("batch", "sequence")),
    TensorSpec("state", "float32", (2, "batch", 128)),
    TensorSpec("sr", "int64", ()),
)


def test_npz_single_input_any_key_cut_per_sample(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", whatever=x)
    data = load_dataset(tmp_path / "d.npz", [IMAGE])
    assert data.samples == 5 and len(data.feeds) == 5
    np.testing.assert_array_equal(data.feeds[3]["pixels"], x[3:4])
    assert data.single_sample_feed()["pixels"].shape == (1, 1, 8, 8)


def test_samples_axis_and_constants(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "s.npz",
        input=np.zeros((4, 1, 512), np.float32),
        state=np.ones((4, 2, 1, 128), np.float32),
        sr=np.array(16000, np.int64),
    )
    data = load_dataset(tmp_path / "s.npz", SILERO_LIKE)
    assert len(data.feeds) == 4
    assert data.feeds[2]["state"].shape == (2, 1, 128)
    assert int(data.feeds[1]["sr"]) == 16000


def test_npy_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "pixels.npy", np.zeros((3, 1, 8, 8), np.float32))
    assert load_dataset(tmp_path, [IMAGE]).samples == 3


def test_image_folder(tmp_path: Path) -> None:
    for index in range(3):
        Image.fromarray(np.full((20, 20), index * 80, np.uint8)).save(tmp_path / f"{index}.png")
    data = load_dataset(tmp_path, [IMAGE])
    assert data.samples == 3
    pixels = data.feeds[2]["pixels"]
    assert pixels.shape == (1, 1, 8, 8) and pixels.dtype == np.float32
    assert pixels.max() == pytest.approx(160 / 255, abs=1e-3)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input": np.zeros((4, 1, 512), np.float32)}, r"no array for model input 'state'"),
        (
            {
                "input": np.zeros((4, 1, 512), np.float32),
                "state": np.zeros((4, 2, 1, 128), np.float32),
                "sr": np.array(16000, np.int64),
                "extra": np.zeros(3),
            },
            r"array 'extra' matches no model input",
        ),
        (
            {
                "input": np.zeros((4, 1, 512), np.float32),
                "state": np.zeros((4, 2, 1, 64), np.float32),
                "sr": np.array(16000, np.int64),
            },
            r"input 'state': model expects shape \[2, batch, 128\], data has \[2, 1, 64\]",
        ),
        (
            {
                "input": np.zeros((4, 1, 512), np.float64),
                "state": np.zeros((4, 2, 1, 128), np.float32),
                "sr": np.array(16000, np.int64),
            },
            r"input 'input': model expects dtype float32, data has float64",
        ),
        (
            {
                "input": np.zeros((4, 1, 512), np.float32),
                "state": np.zeros((3, 2, 1, 128), np.float32),
                "sr": np.array(16000, np.int64),
            },
            r"different numbers of samples",
        ),
    ],
)
def test_mismatched_data_is_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputDataError, match=message):
        load_dataset(tmp_path / "bad.npz", SILERO_LIKE)


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz", [IMAGE])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputDataError, match=r"not a readable \.npz"):
        load_dataset(tmp_path / "junk.npz", [IMAGE])
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(InputDataError, match=r"expected an \.npz file"):
        load_dataset(tmp_path / "data.csv", [IMAGE])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match=r"no \.npy files and no images"):
        load_dataset(empty, [IMAGE])


def test_synthetic_follows_the_signature() -> None:
    spec = [TensorSpec("bytes", "int32", ("n", 2048)), TensorSpec("x", "float32", (1, 3))]
    data = synthetic_dataset(spec, samples=4)
    assert data.kind == "synthetic" and data.samples == 4
    assert data.feeds[0]["bytes"].dtype == np.int32 and data.feeds[0]["bytes"].max() <= 255
    assert data.feeds[0]["x"].shape == (1, 3)
    assert any("unvalidated" in note for note in data.notes)
