"""The validator's metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from edgekit.converters.validate import compare_outputs

from edgekit.profiles import AccuracyTolerance


def test_metrics_by_hand() -> None:
    ref = [np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)]
    cand = [np.array([[1.0, 1.0], [0.0, 2.0]], np.float32)]
    result = compare_outputs({"y": ref}, {"y": cand}, AccuracyTolerance(min_cosine=0.5))
    (metric,) = result.outputs
    assert metric.cosine == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert metric.max_abs_error == 1.0
    assert metric.snr_db == pytest.approx(10 * math.log10(5.0 / 1.0))
    assert metric.top1_agreement == 1.0  # argmax [0, 1] vs [0 (tie -> first), 1]
    assert result.meets_tolerance


def test_failures_name_output_and_limit() -> None:
    ref = [np.eye(4, dtype=np.float32)]
    cand = [np.eye(4, dtype=np.float32)[::-1].copy()]
    result = compare_outputs({"logits": ref}, {"logits": cand}, AccuracyTolerance())
    assert not result.meets_tolerance
    assert any("logits: top-1 agreement 0.0000 < 0.99" in f for f in result.failures)
    assert any("logits: cosine" in f for f in result.failures)


def test_nan_fails_and_identical_passes() -> None:
    ref = [np.ones((2, 3), np.float32)]
    bad = [np.array([[1, np.nan, 1], [1, 1, 1]], np.float32)]
    result = compare_outputs({"y": ref}, {"y": bad}, AccuracyTolerance())
    assert "y: non-finite values (NaN or Inf)" in result.failures
    same = compare_outputs({"y": ref}, {"y": ref}, AccuracyTolerance(min_snr_db=60))
    assert same.meets_tolerance and same.outputs[0].snr_db == 200.0
