"""Same model + data + profile + edgekit version: the same chosen candidate and the same bytes,
run after run, with or without another process loading the CPU.

The digits CNN runs in the default tier; magika and silero (a minute or two per conversion on
two cores) in the slow tier.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from edgekit.converters import convert
from edgekit.converters.examples import DigitsExample

from ..conftest import MAGIKA, SILERO


def _burn(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    value = 0
    while not stop.is_set():
        for index in range(100_000):
            value = (value * 31 + index) % 1_000_003


@contextmanager
def _cpu_burner() -> Iterator[None]:
    """A busy process beside the conversion (one core of the two the tests run on)."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    process = context.Process(target=_burn, args=(stop,), daemon=True)
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


def _runs(model: Path, calibration: Path, validation: Path, out: Path) -> list[tuple[str, str]]:
    results = []
    for index in range(5):
        burner = _cpu_burner() if index == 2 else _no_burner()
        with burner:
            result = convert(
                model,
                profile="raspberrypi",
                output_dir=out / str(index),
                calibration=calibration,
                validation=validation,
                benchmark_seconds=0.5,
            )
        digest = hashlib.sha256(result.artifact.read_bytes()).hexdigest()
        results.append((result.chosen, digest))
    return results


@contextmanager
def _no_burner() -> Iterator[None]:
    yield


def test_digits_five_runs_one_under_load_give_the_same_bytes(
    digits: DigitsExample, tmp_path: Path
) -> None:
    results = _runs(digits.model_path, digits.calibration_path, digits.validation_path, tmp_path)
    assert len(set(results)) == 1, results
    assert results[0][0] == "weight_int8"


@pytest.mark.slow
def test_magika_five_runs_one_under_load_give_the_same_bytes(
    magika_data: tuple[Path, Path], tmp_path: Path
) -> None:
    results = _runs(MAGIKA, *magika_data, tmp_path)
    assert len(set(results)) == 1, results


@pytest.mark.slow
def test_silero_five_runs_one_under_load_give_the_same_bytes(
    silero_data: tuple[Path, Path], tmp_path: Path
) -> None:
    results = _runs(SILERO, *silero_data, tmp_path)
    assert len(set(results)) == 1, results
