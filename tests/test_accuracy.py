"""The validator's metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgekit.accuracy import compare_outputs
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


def _classifier(samples: int, flips: int, *, noise: float = 0.0, seed: int = 0) -> tuple[
    list[np.ndarray], list[np.ndarray]
]:  # fmt: skip
    """Reference logits with a clear winner and a candidate that flips `flips` samples."""
    rng = np.random.default_rng(seed)
    reference, candidate = [], []
    for index in range(samples):
        logits = rng.normal(0, 1, size=(1, 10)).astype(np.float32)
        logits[0, index % 10] = 6.0
        logits[0, (index + 1) % 10] = 5.9  # a close runner-up, as in a real hard sample
        other = logits + rng.normal(0, noise, size=logits.shape).astype(np.float32)
        if index < flips:  # swap the top two classes: the decision changes, the vector barely
            order = np.argsort(other[0])
            top, second = order[-1], order[-2]
            other[0, top], other[0, second] = other[0, second], other[0, top]
        reference.append(logits)
        candidate.append(other)
    return reference, candidate


def test_one_flip_in_seven_samples_no_longer_refuses_a_good_candidate() -> None:
    reference, candidate = _classifier(7, flips=1, noise=0.01)
    tolerance = AccuracyTolerance(min_top1_agreement=0.98, min_cosine=0.9)
    # The plain rule (a 0.98 threshold on 7 samples) refuses any flip ...
    point = compare_outputs({"y": reference}, {"y": candidate}, tolerance)
    assert not point.meets_tolerance
    # ... the statistical rule asks whether 6/7 shows a true agreement below 0.98: it does not.
    result = compare_outputs({"y": reference}, {"y": candidate}, tolerance, rule="statistical")
    assert result.meets_tolerance, result.failures
    (metric,) = result.outputs
    assert (metric.top1_agree, metric.rows, metric.flipped_samples) == (6, 7, (0,))
    assert metric.top1_upper_bound == pytest.approx(0.99270, abs=1e-4)  # Clopper-Pearson
    assert any(
        "cannot show top-1 agreement >= 0.98" in w and ">= 149" in w for w in result.warnings
    )


def test_a_really_worse_candidate_is_still_refused() -> None:
    tolerance = AccuracyTolerance(min_top1_agreement=0.98, min_cosine=0.9)
    few = compare_outputs(*[{"y": v} for v in _classifier(7, flips=2)], tolerance,
                          rule="statistical")  # fmt: skip
    assert not few.meets_tolerance
    assert "top-1 agreement 5/7 shows a rate below 0.98" in few.failures[0]
    many = compare_outputs(*[{"y": v} for v in _classifier(200, flips=12)], tolerance,
                           rule="statistical")  # fmt: skip
    assert not many.meets_tolerance  # 94% agreement over 200 samples
    assert not many.warnings  # 200 samples can show 0.98


def test_cosine_must_be_shown_not_just_reached() -> None:
    rng = np.random.default_rng(3)
    reference = [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(7)]
    # Mean cosine just above 0.99, with a wide spread: the lower bound says little is shown.
    spreads = [0.01, 0.02, 0.03, 0.05, 0.2, 0.25, 0.01]
    candidate = [
        r + rng.normal(0, s, size=r.shape).astype(np.float32)
        for r, s in zip(reference, spreads, strict=True)
    ]
    tolerance = AccuracyTolerance(min_cosine=0.99, min_top1_agreement=0.0)
    result = compare_outputs({"emb": reference}, {"emb": candidate}, tolerance,
                             kinds={"emb": "regression"}, rule="statistical")  # fmt: skip
    (metric,) = result.outputs
    assert metric.cosine > 0.99 > metric.cosine_lower_bound
    assert not result.meets_tolerance
    worst = metric.per_sample[0].worst[0]
    assert worst[0] == 5  # the noisiest sample, by index


def test_probability_maps_are_judged_pooled_and_by_mask_iou() -> None:
    rng = np.random.default_rng(0)
    empty = [np.full((1, 1, 16, 16), 0.01, np.float32) for _ in range(6)]
    objects = []
    for _ in range(4):
        m = np.full((1, 1, 16, 16), 0.01, np.float32)
        m[0, 0, 4:12, 4:12] = 0.95
        objects.append(m)
    reference = empty + objects
    # Noise on the empty maps wrecks their per-image cosine but not the pooled one or the mask.
    candidate = [
        r + np.abs(rng.normal(0, 0.02, size=r.shape)).astype(np.float32) for r in reference
    ]
    tolerance = AccuracyTolerance(min_cosine=0.99, min_iou=0.9)
    result = compare_outputs(
        {"prob": reference}, {"prob": candidate}, tolerance, rule="statistical"
    )
    (metric,) = result.outputs
    assert metric.kind == "map" and metric.kind_source.startswith("guess")
    per_image = {item.metric: item for item in metric.per_sample}
    assert per_image["cosine"].minimum < 0.99  # an empty map's cosine is noise
    assert metric.cosine > 0.99 and metric.iou == 1.0
    assert result.meets_tolerance, result.failures
    shifted = [np.roll(r, 3, axis=3) for r in reference]
    worse = compare_outputs({"prob": reference}, {"prob": shifted}, tolerance, rule="statistical")
    assert any("mask IoU at 0.5" in failure for failure in worse.failures)


def test_output_kind_guesses() -> None:
    from edgekit.accuracy import guess_output_kind

    assert guess_output_kind("logits", [np.zeros((1, 10), np.float32)])[0] == "classifier"
    assert guess_output_kind("prob", [np.zeros((1, 1), np.float32)])[0] == "regression"
    assert guess_output_kind("stateN", [np.zeros((2, 1, 128), np.float32)])[0] == "state"
    assert guess_output_kind("mask", [np.zeros((1, 1, 32, 32), np.float32)])[0] == "map"
