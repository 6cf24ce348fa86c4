"""Accuracy-aware fallback: the fewest tensors kept in float that bring a candidate within
tolerance.

When an int8 candidate misses the tolerance, its tensors are ranked by their measured error
contribution on the calibration data (worst first):

- `weight_int8`: each weight alone stored as int8, the model's output error it causes
  (`rank_weights_by_error`);
- `static_int8`: each node's SQNR loss between its inputs and outputs in the QDQ model
  (`rank_nodes_by_quantization_error`);
- TFLite `full_int8`: each layer's RMSE in quantization steps from TensorFlow's quantization
  debugger (`rank_tflite_layers`).

Then a search finds the smallest k such that keeping the k worst in float meets the tolerance:
first the worse half of the ranking is tried (a candidate with more than half its tensors in
float has lost what it was for; if even that misses, the search stops), then k = 1, 2, 4, ...
until one passes, then bisection between the last failing and the first passing k. Validation
decides each step, so the result is what the report shows; it assumes that keeping more
tensors in float never hurts, which holds closely enough to be useful (the report lists every
attempt). Builds are capped by `quantization.fallback_attempts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.converters.candidates import CandidateReport, Recipe
from edgekit.converters.passes.base import PassContext

__all__ = ["FALLBACK_KINDS", "Ranking", "rank_float_candidates", "search_float_set"]

log = logging.getLogger(__name__)

# Candidate name -> (pass that takes the float set, its option, what the names are).
FALLBACK_KINDS: dict[str, tuple[str, str, str]] = {
    "weight_int8": ("weight_int8", "float_tensors", "tensor"),
    "static_int8": ("static_int8", "nodes_to_exclude", "node"),
    "full_int8": ("tflite_convert", "float_layers", "layer"),
}
_RANKING_FEEDS = 32


@dataclass(frozen=True)
class Ranking:
    """Names worst first, with the score that ranked them and what the score means."""

    names: tuple[str, ...]
    scores: tuple[float, ...]
    unit: str
    method: str


def rank_float_candidates(
    candidate: CandidateReport, source: Path, context: PassContext
) -> Ranking:
    """Rank what `candidate` could keep in float, worst first (see the module docstring)."""
    _, _, unit = FALLBACK_KINDS[candidate.name]
    feeds = context.calibration.head_samples(_RANKING_FEEDS).feeds
    ranked: list[tuple[str, float]]
    if candidate.name == "weight_int8":
        from edgekit.converters.passes.onnx_passes import (
            WeightInt8Config,
            rank_weights_by_error,
        )

        ranked = rank_weights_by_error(source, feeds, min_elements=WeightInt8Config().min_elements)
        method = "output error energy / output energy with only this weight in int8"
    elif candidate.name == "static_int8":
        from edgekit.converters.passes.onnx_passes import rank_nodes_by_quantization_error

        assert candidate.path is not None
        ranked = rank_nodes_by_quantization_error(source, candidate.path, feeds, context.workdir)
        method = "SQNR lost between the node's inputs and outputs (dB)"
    else:
        from edgekit.converters.passes.tflite_passes import (
            TfliteConvertPass,
            rank_tflite_layers,
        )

        config = TfliteConvertPass.config_for(context.profile, kind="full_int8")
        ranked = rank_tflite_layers(source, context, config)
        method = "RMSE of the layer's int8 output in quantization steps (TF debugger)"
    return Ranking(
        names=tuple(name for name, _ in ranked),
        scores=tuple(round(score, 6) for _, score in ranked),
        unit=unit,
        method=method,
    )


def search_float_set(
    candidate: CandidateReport,
    recipe: Recipe,
    ranking: Ranking,
    evaluate: Callable[[Recipe, str], CandidateReport],
    *,
    max_builds: int,
) -> CandidateReport:
    """The candidate rebuilt with the fewest ranked names in float that meets the tolerance.

    `evaluate(recipe, label)` builds and validates one attempt. Returns the passing build with
    the smallest float set (renamed to the candidate's name), or the original candidate with a
    note when none passes within `max_builds`.
    """
    pass_name, option, unit = FALLBACK_KINDS[candidate.name]
    names = ranking.names
    history: list[dict[str, Any]] = [_attempt(0, candidate)]
    builds = 0

    def attempt(count: int) -> CandidateReport:
        nonlocal builds
        builds += 1
        trial = evaluate(
            recipe.with_option(pass_name, **{option: tuple(names[:count])}),
            f"{candidate.name}-fb{count}",
        )
        trial.float_tensors = tuple(names[:count])
        history.append(_attempt(count, trial))
        return trial

    def passes(row: CandidateReport) -> bool:
        return row.status == "ok" and row.validation is not None and row.validation.meets_tolerance

    def finish(best: CandidateReport | None, note: str) -> CandidateReport:
        chosen = best or candidate
        chosen.name = candidate.name
        chosen.fallback = {
            "unit": unit,
            "ranking": {
                "method": ranking.method,
                "worst": [
                    {"name": name, "score": score}
                    for name, score in zip(names[:10], ranking.scores[:10], strict=False)
                ],
                "ranked": len(names),
            },
            "attempts": history,
            "builds": builds,
        }
        chosen.notes.append(note)
        return chosen

    if not names:
        return finish(None, f"accuracy fallback: no per-{unit} errors to rank")
    if max_builds < 1:
        return finish(None, "accuracy fallback disabled (quantization.fallback_attempts: 0)")
    ceiling = max(1, len(names) // 2)
    widest = attempt(ceiling)
    if not passes(widest):
        return finish(
            None,
            f"accuracy fallback: even with the worst {ceiling} of {len(names)} ranked {unit}s "
            "in float the candidate misses the tolerance; the search stops there (more in "
            "float would leave little of the candidate)",
        )
    best, good, bad = widest, ceiling, 0
    count = 1
    while count < good and builds < max_builds:  # gallop: 1, 2, 4, ...
        trial = attempt(count)
        if passes(trial):
            best, good = trial, count
            break
        bad = count
        count *= 2
    while good - bad > 1 and builds < max_builds:  # bisect between the last miss and first pass
        middle = (good + bad) // 2
        trial = attempt(middle)
        if passes(trial):
            best, good = trial, middle
        else:
            bad = middle
    exact = good - bad <= 1
    return finish(
        best,
        f"accuracy fallback: {good} of {len(names)} ranked {unit}(s) kept in float"
        + ("" if exact else f" (search stopped after {builds} builds; fewer may suffice)"),
    )


def _attempt(count: int, row: CandidateReport) -> dict[str, Any]:
    entry: dict[str, Any] = {"float": count}
    if row.validation is None:
        entry["error"] = (row.error or "not validated").splitlines()[0]
        return entry
    entry["meets_tolerance"] = row.validation.meets_tolerance
    entry["worst_cosine"] = round(row.validation.worst_cosine, 6)
    entry["failures"] = list(row.validation.failures)
    return entry
