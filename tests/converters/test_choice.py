"""The choice rule and the fallback search, on candidates whose numbers the test sets.

`choose` takes the latency comparison as a function (the host benchmark, device measurements);
here it is a table, so each rule is exercised exactly. The real measurement is exercised by the
end-to-end conversions (test_convert_models, test_determinism).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from edgekit.converters.benchmark import Measurement, RatioEstimate
from edgekit.converters.candidates import CandidateReport, Recipe
from edgekit.converters.choice import choose, verdict
from edgekit.converters.fallback import Ranking, search_float_set
from edgekit.converters.passes.base import Step

from edgekit.accuracy import compare_outputs
from edgekit.profiles import AccuracyTolerance, load_profile


def _row(
    name: str, size: int, *, cosine: float = 0.999, equal_to: str | None = None
) -> CandidateReport:
    from edgekit.converters.benchmark import LatencySamples

    row = CandidateReport(name=name, passes=(), path=Path(f"{name}.onnx"))
    reference = [np.array([[1.0, 0.0]])]
    found = [np.array([[cosine, math.sqrt(1 - cosine**2)]])]
    row.validation = compare_outputs({"y": reference}, {"y": found}, AccuracyTolerance(0, 0.9))
    row.measurement = Measurement(peak_memory_bytes=1, load_memory_bytes=1, load_ms=1.0)
    row.latency = LatencySamples(source="host")
    row.size_bytes = row.compressed_size_bytes = size
    row.equal_to = equal_to
    return row


def _table(ratios: dict[tuple[str, str], tuple[float, float, float]]):  # type: ignore[no-untyped-def]
    asked: list[tuple[str, str, bool]] = []

    def compare(a: CandidateReport, b: CandidateReport, more: bool) -> RatioEstimate:
        asked.append((a.name, b.name, more))
        if (a.name, b.name) in ratios:
            ratio, low, high = ratios[(a.name, b.name)]
        else:
            ratio, low, high = (1 / x for x in ratios[(b.name, a.name)])
            low, high = high, low
        return RatioEstimate(ratio, low, high, pairs=100)

    return compare, asked


def test_verdicts_against_the_margin() -> None:
    assert verdict(RatioEstimate(0.8, 0.78, 0.82, 50), 0.05) == "faster"
    assert verdict(RatioEstimate(1.3, 1.2, 1.4, 50), 0.05) == "slower"
    assert verdict(RatioEstimate(1.0, 0.97, 1.03, 50), 0.05) == "equal"
    assert verdict(RatioEstimate(0.93, 0.90, 0.96, 50), 0.05) == "inconclusive"
    assert verdict(RatioEstimate(0.5, -math.inf, math.inf, 3), 0.05) == "inconclusive"


def test_equal_by_construction_is_not_raced_and_the_smaller_file_wins() -> None:
    profile = load_profile("raspberrypi")
    fp32, weight = _row("fp32", 4000), _row("weight_int8", 1000, equal_to="fp32")
    static = _row("static_int8", 1100)
    compare, asked = _table({("static_int8", "weight_int8"): (1.4, 1.35, 1.45)})
    winner = choose([fp32, weight, static], profile, compare)
    assert winner is weight and winner.verdict == "chosen"
    assert ("fp32", "weight_int8", True) not in asked and ("weight_int8", "fp32", True) not in asked
    assert "equal latency by construction" in fp32.reason
    assert static.comparison["verdict"] == "slower"


def test_a_challenger_must_be_shown_faster_beyond_the_margin() -> None:
    profile = load_profile("raspberrypi")
    small, fast = _row("static_int8", 1000), _row("fp32", 4000)
    # 12% faster by its estimate, but the interval reaches into the 10% margin: not shown.
    compare, _ = _table({("fp32", "static_int8"): (0.88, 0.84, 0.93)})
    assert choose([small, fast], profile, compare).name == "static_int8"
    assert "not shown faster than static_int8" in fast.reason
    small, fast = _row("static_int8", 1000), _row("fp32", 4000)
    compare, _ = _table({("fp32", "static_int8"): (0.70, 0.66, 0.74)})
    assert choose([small, fast], profile, compare).name == "fp32"
    assert "faster than static_int8" in fast.reason


def test_ties_break_by_accuracy_then_the_fixed_candidate_order() -> None:
    profile = load_profile("raspberrypi")
    equal = (1.0, 0.99, 1.01)
    a, b = _row("dynamic_int8", 1000, cosine=0.999), _row("static_int8", 1000, cosine=0.9999)
    compare, _ = _table({("dynamic_int8", "static_int8"): equal})
    assert choose([a, b], profile, compare).name == "static_int8"  # more accurate
    a, b = _row("static_int8", 1000), _row("dynamic_int8", 1000)
    compare, _ = _table({("static_int8", "dynamic_int8"): equal})
    assert choose([a, b], profile, compare).name == "dynamic_int8"  # earlier in CANDIDATE_ORDER


def _fake_evaluate(threshold: int, built: list[int]):  # type: ignore[no-untyped-def]
    """Builds that meet the tolerance once at least `threshold` tensors stay in float."""

    def evaluate(recipe: Recipe, label: str) -> CandidateReport:
        count = len(dict(recipe.steps[0].options)["float_tensors"])
        built.append(count)
        cosine = 0.999 if count >= threshold else 0.95
        row = _row(label, 1000)
        row.validation = compare_outputs(
            {"y": [np.array([[1.0, 0.0]])]},
            {"y": [np.array([[cosine, math.sqrt(1 - cosine**2)]])]},
            AccuracyTolerance(min_top1_agreement=0.0, min_cosine=0.99),
        )
        return row

    return evaluate


@pytest.mark.parametrize("threshold", [1, 3, 5, 17])
def test_fallback_finds_the_fewest_tensors_in_float(threshold: int) -> None:
    names = tuple(f"t{i}" for i in range(40))
    ranking = Ranking(names=names, scores=tuple(range(40, 0, -1)), unit="tensor", method="test")
    recipe = Recipe("weight_int8", "onnx", (Step.of("weight_int8"), Step.of("compat")))
    failed = _row("weight_int8", 1000, cosine=0.9)
    built: list[int] = []
    best = search_float_set(
        failed, recipe, ranking, _fake_evaluate(threshold, built), max_builds=12
    )
    assert best.float_tensors == names[:threshold]
    assert best.name == "weight_int8"
    assert built[0] == 20  # the worse half first: if that fails, nothing smaller will pass
    assert len(built) <= 2 * math.ceil(math.log2(threshold + 1)) + 2
    assert [a["float"] for a in best.fallback["attempts"]][1:] == built


def test_fallback_stops_when_the_worse_half_does_not_help() -> None:
    names = tuple(f"t{i}" for i in range(10))
    ranking = Ranking(names=names, scores=(1.0,) * 10, unit="node", method="test")
    recipe = Recipe("static_int8", "onnx", (Step.of("static_int8"), Step.of("compat")))
    failed = _row("static_int8", 1000, cosine=0.9)
    built: list[int] = []

    def evaluate(recipe: Recipe, label: str) -> CandidateReport:
        built.append(len(dict(recipe.steps[0].options)["nodes_to_exclude"]))
        return _fake_evaluate(99, [])(recipe.with_option("static_int8", float_tensors=()), label)

    best = search_float_set(failed, recipe, ranking, evaluate, max_builds=8)
    assert built == [5]
    assert best is failed and "the search stops there" in best.notes[-1]
