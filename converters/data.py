"""Calibration and validation data: load it, check it against the model's inputs, or make it up.

A `Dataset` is a list of *feeds*: each a complete mapping from input name to array, ready for
`Runtime.run`. How arrays on disk become feeds, per input (compared with the model's rank R):

- rank R + 1: the leading axis lists samples; feed i gets `array[i]` (stateful models such as
  the silero VAD, whose state input has its batch on axis 1, give their data this way);
- rank R and the model's first axis is dynamic: a batch axis; it is cut into feeds of
  `batch_size` rows (1 by default: a device runs one sample at a time, and dynamic int8's
  activation scales depend on what else is in the batch, so validation must match that);
- rank R otherwise (scalars such as a sample rate): the same value goes into every feed.

Every input must have the same number of samples; anything else is an `InputDataError` naming
the input, what the model expects and what the data holds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgekit.errors import InputDataError
from edgekit.profiles import ImagePreprocessing
from edgekit.runtimes import TensorSpec

__all__ = ["Dataset", "load_dataset", "prepare_datasets", "synthetic_dataset"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Dataset:
    """Feeds for a model, and where they came from."""

    feeds: tuple[dict[str, Array], ...]
    source: str
    kind: Literal["file", "synthetic"]
    samples: int
    notes: tuple[str, ...] = field(default=())
    # Inputs cut along their batch axis (each feed holds several rows of them).
    batched_inputs: frozenset[str] = field(default=frozenset())

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the report."""
        return {
            "source": self.source,
            "kind": self.kind,
            "samples": self.samples,
            "feeds": len(self.feeds),
            "notes": list(self.notes),
        }

    def single_sample_feed(self) -> dict[str, Array]:
        """One feed holding a single sample (batch 1), for latency measurements."""
        return {
            name: array[:1] if name in self.batched_inputs else array
            for name, array in self.feeds[0].items()
        }

    def head_samples(self, count: int) -> Dataset:
        """The first feeds holding at least `count` samples in all (at least one feed)."""
        feeds: list[dict[str, Array]] = []
        rows = 0
        for feed in self.feeds:
            if feeds and rows >= count:
                break
            feeds.append(feed)
            rows += _feed_rows(feed, self.batched_inputs)
        return Dataset(
            feeds=tuple(feeds),
            source=self.source,
            kind=self.kind,
            samples=sum(_feed_rows(feed, self.batched_inputs) for feed in feeds),
            notes=self.notes,
            batched_inputs=self.batched_inputs,
        )


def _feed_rows(feed: Mapping[str, Array], batched_inputs: frozenset[str]) -> int:
    return max((feed[name].shape[0] for name in batched_inputs), default=1)


def load_dataset(
    path: Path,
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int = 1,
    preprocessing: ImagePreprocessing | None = None,
    max_samples: int | None = None,
) -> Dataset:
    """Load `.npz`, a folder of `.npy`, or a folder of images, and check it against `inputs`."""
    if not path.exists():
        raise InputDataError(f"data path {path} does not exist; give an .npz file or a folder")
    arrays: dict[str, Array]
    if path.is_file():
        if path.suffix != ".npz":
            raise InputDataError(
                f"{path}: expected an .npz file (one array per input name), a folder of .npy "
                "files, or a folder of images"
            )
        arrays = _load_npz(path)
    else:
        npy = sorted(path.glob("*.npy"))
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if npy:
            arrays = {p.stem: _load_npy(p) for p in npy}
        elif images:
            arrays = {"__images__": _load_images(images, inputs, preprocessing, path)}
        else:
            raise InputDataError(
                f"{path}: folder holds no .npy files and no images "
                f"({', '.join(_IMAGE_SUFFIXES)}); put calibration data there or give an .npz"
            )
    return arrays_to_dataset(
        arrays, inputs, source=str(path), batch_size=batch_size, max_samples=max_samples
    )


def _load_npz(path: Path) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, EOFError) as e:
        raise InputDataError(
            f"{path}: not a readable .npz archive ({e}); re-save it with numpy.savez"
        ) from e


def _load_npy(path: Path) -> Array:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError, EOFError) as e:
        raise InputDataError(f"{path}: not a readable .npy file ({e})") from e


def _load_images(
    files: Sequence[Path],
    inputs: Sequence[TensorSpec],
    preprocessing: ImagePreprocessing | None,
    folder: Path,
) -> Array:
    from PIL import Image, UnidentifiedImageError

    if len(inputs) != 1:
        raise InputDataError(
            f"{folder}: a folder of images feeds single-input models only; this model has "
            f"{len(inputs)} inputs ({', '.join(spec.name for spec in inputs)}); give an .npz"
        )
    spec = inputs[0]
    prep = preprocessing or _guess_preprocessing(spec)
    height, width = prep.size
    pixels = []
    for file in files:
        try:
            with Image.open(file) as image:
                converted = image.convert("L" if prep.grayscale else "RGB")
                resized = converted.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(resized, dtype=np.float32)
        except (OSError, UnidentifiedImageError) as e:
            raise InputDataError(f"{file}: not a readable image ({e})") from e
        if array.ndim == 2:
            array = array[:, :, None]
        array = array * prep.scale
        channels = array.shape[2]
        mean = np.asarray(prep.mean[:channels], dtype=np.float32)
        std = np.asarray(prep.std[:channels], dtype=np.float32)
        array = (array - mean) / std
        if prep.layout == "NCHW":
            array = array.transpose(2, 0, 1)
        pixels.append(array)
    stacked = np.stack(pixels)
    return stacked.astype(prep.dtype)


def _guess_preprocessing(spec: TensorSpec) -> ImagePreprocessing:
    shape = spec.shape
    if len(shape) != 4:
        raise InputDataError(
            f"input {spec.name!r} has shape {list(shape)}, not an image batch [N, C, H, W] or "
            "[N, H, W, C]; give an .npz instead of an image folder"
        )
    channels_first = shape[1] in (1, 3)
    if channels_first:
        channels, height, width = shape[1], shape[2], shape[3]
    else:
        height, width, channels = shape[1], shape[2], shape[3]
    if not isinstance(height, int) or not isinstance(width, int):
        raise InputDataError(
            f"input {spec.name!r} has dynamic image size {list(shape)}; name the size in the "
            "profile's preprocessing section"
        )
    return ImagePreprocessing(
        size=(height, width),
        layout="NCHW" if channels_first else "NHWC",
        grayscale=channels == 1,
        dtype="float32" if spec.dtype == "float32" else "uint8",
        scale=1.0 / 255.0 if spec.dtype == "float32" else 1.0,
    )


def arrays_to_dataset(
    arrays: Mapping[str, Array],
    inputs: Sequence[TensorSpec],
    *,
    source: str,
    batch_size: int = 1,
    max_samples: int | None = None,
    kind: Literal["file", "synthetic"] = "file",
    notes: Sequence[str] = (),
) -> Dataset:
    """Match named arrays to the model's inputs and cut them into feeds (see module doc)."""
    named = _match_names(arrays, inputs, source)
    modes: dict[str, str] = {}
    counts: dict[str, int] = {}
    for spec in inputs:
        array = named[spec.name]
        _check_dtype(spec, array, source)
        rank = len(spec.shape)
        if array.ndim == rank + 1:
            _check_shape(spec, array.shape[1:], source, batch_note="(leading axis: samples)")
            modes[spec.name] = "per_sample"
            counts[spec.name] = array.shape[0]
        elif array.ndim == rank:
            _check_shape(spec, array.shape, source, batch_note="")
            dynamic_batch = rank > 0 and not isinstance(spec.shape[0], int)
            if dynamic_batch:
                modes[spec.name] = "batch"
                counts[spec.name] = array.shape[0]
            else:
                modes[spec.name] = "constant"
        else:
            raise InputDataError(
                f"{source}: input {spec.name!r}: model expects shape {_fmt_shape(spec.shape)} "
                f"(rank {rank}, or rank {rank + 1} with a leading samples axis); data has shape "
                f"{list(array.shape)}"
            )
    sample_counts = set(counts.values())
    if len(sample_counts) > 1:
        detail = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise InputDataError(
            f"{source}: inputs hold different numbers of samples ({detail}); give every input "
            "the same number"
        )
    total = sample_counts.pop() if sample_counts else 1
    if total == 0:
        raise InputDataError(f"{source}: the data holds no samples")
    if max_samples is not None:
        total = min(total, max_samples)
    batched = any(mode == "batch" for mode in modes.values())
    per_sample = any(mode == "per_sample" for mode in modes.values())
    step = 1 if per_sample or not batched else max(1, batch_size)
    feeds = []
    for start in range(0, total, step):
        stop = min(total, start + step)
        feed: dict[str, Array] = {}
        for spec in inputs:
            array = named[spec.name]
            mode = modes[spec.name]
            if mode == "per_sample":
                feed[spec.name] = np.ascontiguousarray(array[start])
            elif mode == "batch":
                feed[spec.name] = np.ascontiguousarray(array[start:stop])
            else:
                feed[spec.name] = array
        feeds.append(feed)
    return Dataset(
        feeds=tuple(feeds),
        source=source,
        kind=kind,
        samples=total,
        notes=tuple(notes),
        batched_inputs=frozenset(name for name, mode in modes.items() if mode == "batch"),
    )


def _match_names(
    arrays: Mapping[str, Array], inputs: Sequence[TensorSpec], source: str
) -> dict[str, Array]:
    arrays = {key: value for key, value in arrays.items()}
    expected = [spec.name for spec in inputs]
    if len(inputs) == 1 and len(arrays) == 1:
        return {expected[0]: next(iter(arrays.values()))}
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise InputDataError(
            f"{source}: no array for model input {missing[0]!r}; the data holds "
            f"{', '.join(sorted(arrays)) or 'nothing'}; expected one array per input: "
            f"{', '.join(expected)}"
        )
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise InputDataError(
            f"{source}: array {extra[0]!r} matches no model input; the model's inputs are "
            f"{', '.join(expected)}"
        )
    return {name: arrays[name] for name in expected}


def _check_dtype(spec: TensorSpec, array: Array, source: str) -> None:
    if array.dtype == np.dtype(spec.dtype):
        return
    raise InputDataError(
        f"{source}: input {spec.name!r}: model expects dtype {spec.dtype}, data has "
        f"{array.dtype}; convert it (e.g. array.astype(np.{spec.dtype}))"
    )


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], source: str, *, batch_note: str) -> None:
    for expected, actual in zip(spec.shape, shape, strict=True):
        if isinstance(expected, int) and expected != actual:
            raise InputDataError(
                f"{source}: input {spec.name!r}: model expects shape {_fmt_shape(spec.shape)}, "
                f"data has {list(shape)} {batch_note}".rstrip()
            )


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def synthetic_dataset(inputs: Sequence[TensorSpec], *, samples: int = 32, seed: int = 0) -> Dataset:
    """Random inputs drawn from the signature alone; accuracy measured on them is unvalidated."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Array] = {}
    notes = ["synthetic inputs from the model signature: accuracy is unvalidated"]
    for spec in inputs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            else:
                shape.append(1)
                if axis > 0:
                    notes.append(f"input {spec.name!r}: dynamic axis {axis} set to 1")
        full = (samples, *shape)
        dtype = np.dtype(spec.dtype) if spec.dtype != "str" else None
        if dtype is None:
            raise InputDataError(f"input {spec.name!r} is a string tensor; give data for it")
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(full).clip(-3, 3).astype(dtype)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 256, size=full).astype(dtype)
            notes.append(f"input {spec.name!r}: integers drawn from 0..255")
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, size=full).astype(bool)
        else:
            raise InputDataError(f"input {spec.name!r}: cannot synthesize dtype {dtype}")
    return arrays_to_dataset(arrays, inputs, source="synthetic", kind="synthetic", notes=notes)


# A single data set is split only when both halves keep at least this many samples.
_MIN_SPLIT_SAMPLES = 8
# Every third sample of a single data set validates, the rest calibrate.
_VALIDATION_STRIDE = 3


def _feed_digest(feed: Mapping[str, Array]) -> str:
    digest = hashlib.sha256()
    for name in sorted(feed):
        array = np.ascontiguousarray(feed[name])
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _subset(dataset: Dataset, indices: Sequence[int], note: str) -> Dataset:
    feeds = tuple(dataset.feeds[i] for i in indices)
    return replace(
        dataset,
        feeds=feeds,
        samples=sum(_feed_rows(feed, dataset.batched_inputs) for feed in feeds),
        notes=(*dataset.notes, note),
    )


def prepare_datasets(
    inputs: Sequence[TensorSpec],
    calibration: Path | None,
    validation: Path | None,
    *,
    preprocessing: ImagePreprocessing | None = None,
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """Calibration and validation sets that never share a sample, and notes saying how.

    - Both given: validation samples that also appear in the calibration data are dropped
      (all of them: the two sets are the same data, handled as one set below).
    - One given: split deterministically, every third sample validating, when both parts keep
      at least 8 samples; otherwise both use the same samples and the note says so.
    - None: synthetic inputs with different seeds for each (accuracy is unvalidated).
    """
    cal = load_dataset(calibration, inputs, preprocessing=preprocessing) if calibration else None
    val = load_dataset(validation, inputs, preprocessing=preprocessing) if validation else None
    if cal is None and val is None:
        return (
            synthetic_dataset(inputs, seed=0),
            synthetic_dataset(inputs, seed=1),
            (
                "synthetic calibration and validation inputs (different seeds): accuracy is "
                "unvalidated",
            ),
        )
    if cal is not None and val is not None:
        seen = {_feed_digest(feed) for feed in cal.feeds}
        fresh = [i for i, feed in enumerate(val.feeds) if _feed_digest(feed) not in seen]
        if len(fresh) == len(val.feeds):
            return cal, val, ("calibration and validation data share no sample",)
        if fresh:
            dropped = len(val.feeds) - len(fresh)
            note = f"{dropped} validation sample(s) also in the calibration data were dropped"
            return cal, _subset(val, fresh, note), (note,)
        val = None  # the same samples twice: one set
    single = cal if cal is not None else val
    assert single is not None
    given = "--calibration" if cal is not None else "--validation"
    count = len(single.feeds)
    held_out = [i for i in range(count) if i % _VALIDATION_STRIDE == _VALIDATION_STRIDE - 1]
    rest = [i for i in range(count) if i % _VALIDATION_STRIDE != _VALIDATION_STRIDE - 1]
    if len(held_out) >= _MIN_SPLIT_SAMPLES and len(rest) >= _MIN_SPLIT_SAMPLES:
        note = (
            f"one data set given ({given}): split into {len(rest)} calibration and "
            f"{len(held_out)} validation samples (every third sample validates)"
        )
        return _subset(single, rest, note), _subset(single, held_out, note), (note,)
    note = (
        f"one data set given ({given}) with {count} samples, too few to split: calibration and "
        "validation use the same samples, so accuracy is measured on data the quantizer saw"
    )
    marked = replace(single, notes=(*single.notes, note))
    return marked, marked, (note,)
