"""Magnitude pruning of TFLite candidates (`tflite_prune`): every kind TFLiteConverter builds,
sparsity recounted from the flatbuffer, accuracy on held-out digits, the compressed size it
buys, the accuracy guard, and the pruned model on tflite-runtime 2.14."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from edgekit.converters.benchmark import compressed_size
from edgekit.converters.data import Dataset, load_dataset
from edgekit.converters.outputs import write_golden as _write_golden
from edgekit.converters.passes.base import PassContext
from edgekit.converters.passes.tflite_passes import (
    TensorFlowModel,
    TfliteConvertConfig,
    TfliteConvertPass,
)
from edgekit.converters.passes.tflite_prune import (
    TflitePruneConfig,
    TflitePrunePass,
    magnitude_mask,
    prune_tflite,
    weight_sparsity,
    weight_tensors,
)
from edgekit.converters.tflite_compat import blocking_ops, tflite_op_versions
from edgekit.converters.tflite_examples import KerasDigitsExample, export_keras_digits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.accuracy import compare_outputs
from edgekit.errors import ConversionError
from edgekit.profiles import load_profile
from edgekit.runtimes import LiteRtBackend, dequantize_output, quantize_input

Array = npt.NDArray[Any]
KINDS = ("fp32", "fp16", "dynamic_int8", "full_int8")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> KerasDigitsExample:
    return export_keras_digits(tmp_path_factory.mktemp("prune-digits"))


@pytest.fixture(scope="module")
def built(digits: KerasDigitsExample, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each TFLiteConverter candidate kind of the digits CNN."""
    folder = tmp_path_factory.mktemp("prune-kinds")
    calibration = load_dataset(digits.calibration_path, TensorFlowModel(digits.saved_model).inputs)
    context = PassContext(
        profile=load_profile("raspberrypi-tflite"),
        workdir=folder,
        threads=1,
        calibration=calibration,
    )
    paths = {}
    for kind in KINDS:
        paths[kind] = folder / f"{kind}.tflite"
        TfliteConvertPass(TfliteConvertConfig(kind=kind)).run(  # type: ignore[arg-type]
            digits.saved_model, paths[kind], context
        )
    return paths


def _logits(path: Path, x: Array) -> Array:
    runtime = LiteRtBackend(path)
    (given_spec,), (taken,) = runtime.inputs, runtime.outputs
    rows = [
        dequantize_output(
            taken, runtime.run({given_spec.name: quantize_input(given_spec, row)})[taken.name]
        )
        for row in (x[i : i + 1] for i in range(len(x)))
    ]
    return np.concatenate(rows).astype(np.float64)


def test_magnitude_mask_takes_the_smallest_fraction() -> None:
    values = np.array([[-5.0, 0.1, 3.0, -0.2], [0.05, 7.0, -0.3, 2.0]])
    mask = magnitude_mask(values, 0.5)
    assert mask.sum() == 4
    assert set(np.abs(values[mask])) == {0.1, 0.2, 0.05, 0.3}
    assert not magnitude_mask(values, 0.1).any()  # int(8 * 0.1) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_prunes_to_the_sparsity_and_compresses(
    kind: str, built: dict[str, Path], digits: KerasDigitsExample, tmp_path: Path
) -> None:
    source = built[kind]
    content = source.read_bytes()
    tensors = [t for t in weight_tensors(content) if t.elements >= 1024]
    assert len(tensors) == 2  # conv2 (3x3x16x32) and dense (512x64); the rest are < 1024
    assert weight_sparsity(content, min_elements=1024) < 0.05
    destination = tmp_path / "pruned.tflite"
    result = TflitePrunePass(TflitePruneConfig(sparsity=0.5, min_elements=1024)).run(
        source, destination, PassContext(load_profile("raspberrypi-tflite"), tmp_path, 1)
    )
    pruned = destination.read_bytes()
    # Recounted from the written file (real values, per-channel scales for int8). Dynamic int8
    # for raspberrypi-tflite stores dense weights per tensor (tflite-runtime 2.14 needs it),
    # where a few small weights already round to zero: up to 2% above the target.
    assert weight_sparsity(pruned, min_elements=1024) == pytest.approx(0.5, abs=0.02)
    assert result.details["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert {t["dtype"] for t in result.details["tensors"]} == {
        {"fp32": "float32", "fp16": "float16"}.get(kind, "int8")
    }
    # Same structure and op versions: only weight bytes changed.
    assert len(pruned) == len(content)
    assert tflite_op_versions(destination) == tflite_op_versions(source)
    changed = np.flatnonzero(np.frombuffer(pruned, np.uint8) != np.frombuffer(content, np.uint8))
    spans = [(t.data_offset, t.data_offset + t.elements * t.dtype.itemsize) for t in tensors]
    assert all(any(a <= i < b for a, b in spans) for i in changed)
    # What it buys: the zstd size.
    assert compressed_size(destination) < 0.8 * compressed_size(source)
    # Still a digits classifier.
    accuracy = float((_logits(destination, digits.x_test).argmax(1) == digits.y_test).mean())
    assert accuracy > 0.9, accuracy


def test_accuracy_guard_rejects_an_over_pruned_model(
    built: dict[str, Path], digits: KerasDigitsExample, tmp_path: Path
) -> None:
    tolerance = load_profile("raspberrypi-tflite").accuracy
    source = built["dynamic_int8"]
    reference = {"logits": list(_logits(source, digits.x_test)[:, None, :])}
    verdicts = {}
    for sparsity in (0.3, 0.95):
        pruned, _ = prune_tflite(source.read_bytes(), sparsity=sparsity, min_elements=1024)
        path = tmp_path / f"pruned-{sparsity}.tflite"
        path.write_bytes(pruned)
        found = {"logits": list(_logits(path, digits.x_test)[:, None, :])}
        verdicts[sparsity] = compare_outputs(reference, found, tolerance)
    assert not verdicts[0.95].meets_tolerance
    assert any("top-1" in failure or "cosine" in failure for failure in verdicts[0.95].failures)
    assert verdicts[0.3].worst_cosine > verdicts[0.95].worst_cosine


def test_nothing_to_prune_and_bad_sparsity_are_clear_errors(built: dict[str, Path]) -> None:
    content = built["fp32"].read_bytes()
    with pytest.raises(ConversionError, match="no weight tensor of 10000000 or more"):
        prune_tflite(content, sparsity=0.5, min_elements=10_000_000)
    with pytest.raises(ConversionError, match=r"sparsity must be in \(0, 1\)"):
        prune_tflite(content, sparsity=1.0)


def test_pruned_model_runs_on_tflite_runtime_2_14(
    built: dict[str, Path], digits: KerasDigitsExample, runtime_cache: Path, tmp_path: Path
) -> None:
    from edgekit.verify_runtime import verify_runtime

    profile = load_profile("raspberrypi-tflite")
    folder = tmp_path / "out"
    folder.mkdir()
    model = folder / "model.tflite"
    pruned, _ = prune_tflite(built["full_int8"].read_bytes(), sparsity=0.5, min_elements=1024)
    model.write_bytes(pruned)
    assert blocking_ops(model, profile) == []
    runtime = LiteRtBackend(model)
    feeds = tuple({"pixels": digits.x_test[i : i + 1]} for i in range(8))
    _write_golden(
        folder / "golden.npz",
        runtime,
        Dataset(feeds=feeds, source="test", kind="file", samples=8),
        profile,
    )
    report = verify_runtime(folder, profile, cache_dir=runtime_cache, which="oldest")
    assert report.checks  # one per CPU the profile names (emulated aarch64)
    for check in report.checks:
        assert check.package == "tflite-runtime" and check.version == "2.14.0"
        assert check.status == "pass", check.to_dict()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_corrupted_models_raise_only_conversion_errors(
    built: dict[str, Path], data: st.DataObject
) -> None:
    content = bytearray(built["full_int8"].read_bytes())
    # Corrupt the flatbuffer's tables (the first few KB), not only weight bytes.
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, min(len(content), 4096) - 1))
        content[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([len(content), len(content) // 2, 64, 7]))
    # Either it prunes what it could read, or it says the file is broken: nothing else escapes.
    with contextlib.suppress(ConversionError):
        prune_tflite(bytes(content[:cut]), sparsity=0.5, min_elements=16)
