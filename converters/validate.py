"""Compare a candidate's outputs with the original model's, per output, against a tolerance.

Definitions (the tests recompute them independently; docs/converter.md repeats them):

- Outputs of every feed are cut into *rows*: an output of rank >= 2 gives one row per index of
  its first axis (flattened), a scalar or vector gives one row.
- `cosine`: the mean over rows of cos(reference_row, candidate_row); two all-zero rows count 1.
- `top1_agreement` (classifier outputs only: float, rank 2, more than one class): the fraction
  of rows whose argmax agrees.
- `max_abs_error`: the largest |reference - candidate| over all elements.
- `snr_db`: 10 log10(sum(reference^2) / sum((reference - candidate)^2)), capped at 200 dB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgekit.profiles import AccuracyTolerance

__all__ = ["OutputMetrics", "ValidationResult", "compare_outputs", "to_rows"]

Array = npt.NDArray[Any]
SNR_CAP_DB = 200.0


@dataclass(frozen=True)
class OutputMetrics:
    """How one output of a candidate compares with the original's."""

    name: str
    rows: int
    cosine: float
    max_abs_error: float
    snr_db: float
    top1_agreement: float | None  # None when the output is not a classifier's
    finite: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "rows": self.rows,
            "cosine": self.cosine,
            "max_abs_error": self.max_abs_error,
            "snr_db": self.snr_db,
            "top1_agreement": self.top1_agreement,
            "finite": self.finite,
        }


@dataclass(frozen=True)
class ValidationResult:
    """All outputs' metrics and whether they meet the tolerance (with reasons when not)."""

    outputs: tuple[OutputMetrics, ...]
    failures: tuple[str, ...]

    @property
    def meets_tolerance(self) -> bool:
        """True when every output meets every limit of the tolerance."""
        return not self.failures

    @property
    def worst_cosine(self) -> float:
        """The lowest cosine over outputs (a single number for ranking candidates)."""
        return min(metric.cosine for metric in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "meets_tolerance": self.meets_tolerance,
            "failures": list(self.failures),
            "outputs": {metric.name: metric.to_dict() for metric in self.outputs},
        }


def to_rows(batches: Sequence[Array]) -> Array:
    """Stack one output's arrays from several feeds into float64 rows (see module doc)."""
    rows = []
    for array in batches:
        values = np.asarray(array, dtype=np.float64)
        if values.ndim >= 2:
            rows.append(values.reshape(values.shape[0], -1))
        else:
            rows.append(values.reshape(1, -1))
    widths = {row.shape[1] for row in rows}
    if len(widths) > 1:
        # Outputs whose per-row size varies between feeds: compare them as one long row each.
        return np.concatenate([row.reshape(1, -1) for row in rows], axis=1)
    return np.concatenate(rows, axis=0)


def _is_classifier(batches: Sequence[Array]) -> bool:
    first = np.asarray(batches[0])
    return first.dtype.kind == "f" and first.ndim == 2 and first.shape[1] > 1


def compare_outputs(
    reference: Mapping[str, Sequence[Array]],
    candidate: Mapping[str, Sequence[Array]],
    tolerance: AccuracyTolerance,
) -> ValidationResult:
    """Metrics for every output in `reference` (name -> arrays per feed) and the verdict."""
    metrics = []
    failures = []
    for name, ref_batches in reference.items():
        cand_batches = candidate[name]
        ref = to_rows(ref_batches)
        cand = to_rows(cand_batches)
        if ref.shape != cand.shape:
            failures.append(f"{name}: shape {list(cand.shape)} differs from {list(ref.shape)}")
            continue
        finite = bool(np.isfinite(cand).all())
        diff = ref - cand
        ref_norm = np.linalg.norm(ref, axis=1)
        cand_norm = np.linalg.norm(cand, axis=1)
        dots = (ref * cand).sum(axis=1)
        both_zero = (ref_norm == 0) & (cand_norm == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            row_cos = np.where(both_zero, 1.0, dots / (ref_norm * cand_norm))
        row_cos = np.nan_to_num(row_cos, nan=0.0)
        cosine = float(row_cos.mean()) if finite else 0.0
        max_abs = float(np.abs(diff).max()) if finite and diff.size else 0.0
        if not finite:
            max_abs = math.inf
        noise = float((diff**2).sum())
        signal = float((ref**2).sum())
        if not finite:
            snr = -SNR_CAP_DB
        elif noise == 0.0:
            snr = SNR_CAP_DB
        elif signal == 0.0:
            snr = -SNR_CAP_DB
        else:
            snr = min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))
        top1 = None
        if _is_classifier(ref_batches):
            top1 = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())
        metric = OutputMetrics(
            name=name,
            rows=int(ref.shape[0]),
            cosine=cosine,
            max_abs_error=max_abs,
            snr_db=snr,
            top1_agreement=top1,
            finite=finite,
        )
        metrics.append(metric)
        failures.extend(_check(metric, tolerance))
    return ValidationResult(outputs=tuple(metrics), failures=tuple(failures))


def _check(metric: OutputMetrics, tolerance: AccuracyTolerance) -> list[str]:
    found = []
    if not metric.finite:
        found.append(f"{metric.name}: non-finite values (NaN or Inf)")
    if metric.cosine < tolerance.min_cosine:
        found.append(f"{metric.name}: cosine {metric.cosine:.4f} < {tolerance.min_cosine}")
    if metric.top1_agreement is not None and metric.top1_agreement < tolerance.min_top1_agreement:
        found.append(
            f"{metric.name}: top-1 agreement {metric.top1_agreement:.4f} < "
            f"{tolerance.min_top1_agreement}"
        )
    if tolerance.min_snr_db is not None and metric.snr_db < tolerance.min_snr_db:
        found.append(f"{metric.name}: SNR {metric.snr_db:.1f} dB < {tolerance.min_snr_db} dB")
    if tolerance.max_abs_error is not None and metric.max_abs_error > tolerance.max_abs_error:
        found.append(
            f"{metric.name}: max abs error {metric.max_abs_error:.4g} > {tolerance.max_abs_error}"
        )
    return found
