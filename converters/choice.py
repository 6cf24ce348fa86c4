"""The choice: which eligible candidate ships, by rules that state their uncertainty.

1. *Eligible*: within the accuracy tolerance (`edgekit.accuracy`) and the size and
   RAM budgets.
2. *Preference order*: smaller file first, then more accurate (worst cosine), then smaller zstd
   size, then the fixed candidate order (`CANDIDATE_ORDER`). This order alone decides with
   `priority: size`.
3. With `priority: latency`, the most preferred candidate is the incumbent, and each next
   candidate in preference order challenges it: it takes over only when it is *materially
   faster*: the confidence interval of latency(challenger) / latency(incumbent) lies entirely
   below 1 - `quantization.min_speedup` (10%). Candidates that are the same graph once the
   runtime folds constants (`equal_to`) are equal by construction and never raced. An
   inconclusive comparison (the interval straddles the margin) is measured again, up to a
   budget; if it stays inconclusive, the incumbent stays.

So the result depends only on which differences the measurements *show*: a machine under load
widens intervals (fewer challengers win) but does not flip a shown difference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

from edgekit.converters.benchmark import RatioEstimate
from edgekit.converters.candidates import CandidateReport, order_key

from edgekit.errors import ConversionError
from edgekit.profiles import Profile

__all__ = ["Verdict", "choose", "latency_class", "preference_key", "verdict"]

log = logging.getLogger(__name__)

Verdict = Literal["faster", "slower", "equal", "inconclusive"]
Compare = Callable[[CandidateReport, CandidateReport, bool], RatioEstimate]
"""(challenger, incumbent, may_measure_more) -> latency(challenger) / latency(incumbent)."""


def verdict(estimate: RatioEstimate, min_speedup: float) -> Verdict:
    """What a ratio interval shows against the margin (symmetric in log space)."""
    faster_below = 1.0 - min_speedup
    slower_above = 1.0 / faster_below
    if not (math.isfinite(estimate.low) and math.isfinite(estimate.high)):
        return "inconclusive"
    if estimate.high < faster_below:
        return "faster"
    if estimate.low > slower_above:
        return "slower"
    if estimate.low >= faster_below and estimate.high <= slower_above:
        return "equal"
    return "inconclusive"


def latency_class(row: CandidateReport) -> str:
    """The candidate whose measured latency stands for `row` (itself unless `equal_to`)."""
    return row.equal_to or row.name


def _eligible(candidates: Sequence[CandidateReport], profile: Profile) -> list[CandidateReport]:
    budgets = profile.budgets
    eligible: list[CandidateReport] = []
    for row in candidates:
        if not row.usable:
            row.reason = row.reason or f"failed: {row.error}"
            continue
        assert row.validation is not None and row.measurement is not None
        assert row.size_bytes is not None
        if not row.validation.meets_tolerance:
            row.reason = "misses the accuracy tolerance: " + "; ".join(row.validation.failures)
            continue
        if budgets.max_model_bytes is not None and row.size_bytes > budgets.max_model_bytes:
            row.reason = f"over the size budget: {row.size_bytes} > {budgets.max_model_bytes} bytes"
            continue
        peak = row.measurement.peak_memory_bytes
        if budgets.max_ram_bytes is not None and peak > budgets.max_ram_bytes:
            row.reason = f"over the RAM budget: {peak} > {budgets.max_ram_bytes} bytes"
            continue
        eligible.append(row)
    if not eligible:
        detail = "; ".join(f"{row.name}: {row.reason}" for row in candidates)
        unmeasured = [row for row in candidates if row.reason.startswith("not measured on ")]
        if unmeasured and len(unmeasured) == len([r for r in candidates if r.status != "ok"]):
            where = unmeasured[0].reason.removeprefix("not measured on ")
            raise ConversionError(
                f"none of the candidates this conversion built was measured on {where}: the "
                "measurements are for other bytes (another model, data, profile or edgekit "
                "version); convert with --keep-candidates, run `edgekit-agent bench` on "
                "out/candidates on the device, and convert again with the file it writes"
            )
        raise ConversionError(
            f"no candidate meets profile {profile.name}: {detail}; loosen the profile's accuracy "
            "tolerance or budgets, or give calibration data closer to real inputs"
        )
    return eligible


def preference_key(row: CandidateReport) -> tuple[int, float, int, int, str]:
    """Smaller file, more accurate, smaller zstd, then the fixed candidate order."""
    assert row.size_bytes is not None and row.validation is not None
    return (
        row.size_bytes,
        -round(row.validation.worst_cosine, 6),
        row.compressed_size_bytes or 0,
        order_key(row.name),
        row.name,
    )


def choose(
    candidates: Sequence[CandidateReport],
    profile: Profile,
    compare: Compare,
    *,
    latency_note: str = "",
) -> CandidateReport:
    """The candidate to ship; every row's `reason` (and `comparison`) says why."""
    eligible = sorted(_eligible(candidates, profile), key=preference_key)
    margin = profile.quantization.min_speedup
    if profile.priority == "size":
        winner = eligible[0]
        winner.reason = "smallest file within tolerance and budgets (profile priority: size)"
        for row in eligible[1:]:
            row.reason = f"larger: {row.size_bytes} bytes vs {winner.size_bytes}"
        return _crown(winner)
    incumbent = eligible[0]
    incumbent.reason = "smallest file within tolerance and budgets"
    for challenger in eligible[1:]:
        if latency_class(challenger) == latency_class(incumbent):
            challenger.reason = (
                f"same graph as {incumbent.name} once the runtime folds constants (equal "
                f"latency by construction), and {_why_less_preferred(challenger, incumbent)}"
            )
            continue
        estimate = compare(challenger, incumbent, True)
        shown = verdict(estimate, margin)
        challenger.comparison = {"against": incumbent.name, **estimate.to_dict(), "verdict": shown}
        if shown == "faster":
            incumbent.reason = (
                f"{challenger.name} is faster: latency ratio {estimate} < {1 - margin:.2f}"
            )
            challenger.reason = (
                f"faster than {incumbent.name}: latency ratio {estimate}, below 1 - min_speedup "
                f"({1 - margin:.2f})"
            )
            incumbent = challenger
            continue
        what = {
            "slower": "slower than",
            "equal": "as fast as (within the margin)",
            "inconclusive": "not shown faster than",
        }[shown]
        challenger.reason = (
            f"{what} {incumbent.name} (latency ratio {estimate}; faster needs < "
            f"{1 - margin:.2f}) and {_why_less_preferred(challenger, incumbent)}"
        )
    # Final wording for the winner, and each loser's ratio against it for the report.
    for row in eligible:
        if row is incumbent or latency_class(row) == latency_class(incumbent):
            continue
        if not row.comparison or row.comparison.get("against") != incumbent.name:
            estimate = compare(row, incumbent, False)
            row.comparison = {
                "against": incumbent.name,
                **estimate.to_dict(),
                "verdict": verdict(estimate, margin),
            }
    if incumbent is eligible[0]:
        incumbent.reason = (
            "smallest file within tolerance and budgets; no other candidate was shown faster "
            f"by more than {margin:.0%}{latency_note}"
        )
    else:
        incumbent.reason += latency_note
    return _crown(incumbent)


def _why_less_preferred(row: CandidateReport, other: CandidateReport) -> str:
    assert row.size_bytes is not None and other.size_bytes is not None
    if row.size_bytes != other.size_bytes:
        return f"larger ({row.size_bytes} vs {other.size_bytes} bytes)"
    assert row.validation is not None and other.validation is not None
    if round(row.validation.worst_cosine, 6) != round(other.validation.worst_cosine, 6):
        return (
            f"less accurate (worst cosine {row.validation.worst_cosine:.6f} vs "
            f"{other.validation.worst_cosine:.6f})"
        )
    if (row.compressed_size_bytes or 0) != (other.compressed_size_bytes or 0):
        return f"larger compressed ({row.compressed_size_bytes} vs {other.compressed_size_bytes})"
    return "later in the fixed candidate order"


def _crown(winner: CandidateReport) -> CandidateReport:
    winner.verdict = "chosen"
    return winner
