"""Compare a candidate's outputs with the original model's, per output, against a tolerance.

Each output has a *kind* that says which comparison means something for it
(docs/converter.md, "Accuracy decisions", repeats these definitions; the tests recompute them):

- `classifier` (float scores over classes, rank 2 with more than one class): the decision is the
  top-1 class. `top1_agreement` = share of samples whose argmax agrees; `cosine` = mean over
  samples of cos(reference, candidate) of their score vectors.
- `map` (probability or logit maps of detectors and segmenters, rank >= 3): a per-image cosine
  is noise on images with nothing in them, so `cosine` is *pooled* (one cosine over every
  value of every sample), and the decision the map feeds is judged as mask IoU at a threshold
  (0.5 for maps within [0, 1], else 0: logits), pooled over samples.
- `regression` (anything else: scores, embeddings, one probability per sample): `cosine` is the
  mean per-sample cosine when a sample has several values, the pooled cosine when it has one
  (the cosine of a single number is only its sign).
- `state` (recurrent state handed to the next call): pooled cosine.

Per sample (one feed each: validation runs one sample per feed): the cosine (or IoU) of each
sample, with its distribution and the worst samples by index in the report. Always:
`max_abs_error` over all values, `snr_db` = 10 log10(signal energy / error energy) capped at
200 dB, and `finite` (any NaN/Inf fails the output).

Decisions (`rule="statistical"`, the converter's): a candidate must *show* it keeps cosine and
IoU: the one-sided lower confidence bound (`accuracy.confidence`, default 95%) must reach the
limit (Student t on per-sample means, a seeded bootstrap over samples for pooled values). Top-1
flips are rare binary events, so a candidate is refused only when they *show* it is worse: when
the upper confidence bound of its agreement rate (Clopper-Pearson) is below the limit. When the
validation set is too small for a perfect record to show the limit, the result carries a
warning with the number of samples that would. `rule="point"` compares the plain values with
the limits (the on-device golden check, where reference and candidate are the same artifact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from edgekit.profiles import AccuracyTolerance, OutputKind
from edgekit.stats import (
    bootstrap_lower_bound,
    clopper_pearson_upper,
    samples_to_show_rate,
    t_lower_bound,
)

__all__ = [
    "OUTPUT_KINDS",
    "OutputKind",
    "OutputMetrics",
    "SampleDistribution",
    "ValidationResult",
    "compare_outputs",
    "guess_output_kind",
    "to_rows",
]

Array = npt.NDArray[Any]
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)
Rule = Literal["statistical", "point"]
SNR_CAP_DB = 200.0
_WORST_SAMPLES = 5
_STATE_WORDS = ("state", "hidden", "cell", "h_n", "c_n", "hn", "cn", "memory", "cache")


@dataclass(frozen=True)
class SampleDistribution:
    """A per-sample metric over the validation set: summary and the worst samples by index."""

    metric: str
    count: int
    mean: float
    minimum: float
    p05: float
    median: float
    worst: tuple[tuple[int, float], ...]  # (sample index, value), worst first

    @classmethod
    def of(cls, metric: str, values: Array) -> SampleDistribution:
        """Summarize `values` (one per sample, higher is better)."""
        order = np.argsort(values, kind="stable")[:_WORST_SAMPLES]
        return cls(
            metric=metric,
            count=int(values.size),
            mean=float(values.mean()),
            minimum=float(values.min()),
            p05=float(np.quantile(values, 0.05)),
            median=float(np.median(values)),
            worst=tuple((int(i), float(values[i])) for i in order),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "metric": self.metric,
            "count": self.count,
            "mean": self.mean,
            "min": self.minimum,
            "p05": self.p05,
            "median": self.median,
            "worst": [{"sample": index, "value": value} for index, value in self.worst],
        }


@dataclass(frozen=True)
class OutputMetrics:
    """How one output of a candidate compares with the original's."""

    name: str
    kind: OutputKind
    kind_source: str  # "profile", "--output-kind" or "guess: <why>"
    rows: int  # samples compared
    cosine: float
    cosine_lower_bound: float
    max_abs_error: float
    snr_db: float
    top1_agreement: float | None  # classifier outputs only
    finite: bool
    top1_agree: int | None = None
    top1_upper_bound: float | None = None
    flipped_samples: tuple[int, ...] = ()
    iou: float | None = None  # map outputs only
    iou_lower_bound: float | None = None
    map_threshold: float | None = None
    per_sample: tuple[SampleDistribution, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data: dict[str, Any] = {
            "kind": self.kind,
            "kind_source": self.kind_source,
            "rows": self.rows,
            "cosine": self.cosine,
            "cosine_lower_bound": self.cosine_lower_bound,
            "max_abs_error": self.max_abs_error,
            "snr_db": self.snr_db,
            "top1_agreement": self.top1_agreement,
            "finite": self.finite,
        }
        if self.top1_agreement is not None:
            data["top1_agree"] = self.top1_agree
            data["top1_upper_bound"] = self.top1_upper_bound
            data["flipped_samples"] = list(self.flipped_samples)
        if self.iou is not None:
            data["iou"] = self.iou
            data["iou_lower_bound"] = self.iou_lower_bound
            data["map_threshold"] = self.map_threshold
        data["per_sample"] = [item.to_dict() for item in self.per_sample]
        return data


@dataclass(frozen=True)
class ValidationResult:
    """All outputs' metrics and whether they meet the tolerance (with reasons when not)."""

    outputs: tuple[OutputMetrics, ...]
    failures: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    rule: Rule = "point"
    confidence: float = 0.95

    @property
    def meets_tolerance(self) -> bool:
        """True when every output meets every limit of the tolerance."""
        return not self.failures

    @property
    def worst_cosine(self) -> float:
        """The lowest cosine over outputs (a single number for ranking candidates)."""
        return min((metric.cosine for metric in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "meets_tolerance": self.meets_tolerance,
            "rule": self.rule,
            "confidence": self.confidence,
            "failures": list(self.failures),
            "warnings": list(self.warnings),
            "outputs": {metric.name: metric.to_dict() for metric in self.outputs},
        }


def to_rows(batches: Sequence[Array]) -> Array:
    """Stack one output's arrays from several feeds into float64 rows, one per feed.

    Feeds whose outputs differ in size are compared as one long row each.
    """
    rows = [np.asarray(array, dtype=np.float64).reshape(1, -1) for array in batches]
    widths = {row.shape[1] for row in rows}
    if len(widths) > 1:
        return np.concatenate([row.reshape(1, -1) for row in rows], axis=1)
    return np.concatenate(rows, axis=0)


def _rows(batches: Sequence[Array], kind: OutputKind) -> Array:
    """Rows to compare: a classifier's score vectors (any batch), else one row per feed."""
    first = np.asarray(batches[0])
    if kind == "classifier" and first.ndim >= 1 and first.size:
        width = first.shape[-1]
        arrays = [np.asarray(array, dtype=np.float64) for array in batches]
        if all(array.ndim >= 1 and array.shape[-1] == width for array in arrays):
            return np.concatenate([array.reshape(-1, width) for array in arrays], axis=0)
    return to_rows(batches)


def guess_output_kind(
    name: str, batches: Sequence[Array], *, input_shapes: Mapping[str, tuple[int, ...]] = {}
) -> tuple[OutputKind, str]:
    """A sane guess of an output's kind from its name, dtype and shape, and why."""
    first = np.asarray(batches[0])
    lowered = name.lower()
    if any(word in lowered for word in _STATE_WORDS) or (
        first.shape and first.shape in set(input_shapes.values()) and first.ndim >= 2
    ):
        why = "name says state" if any(w in lowered for w in _STATE_WORDS) else "shape of an input"
        return "state", f"guess: {why}"
    if first.dtype.kind != "f":
        return "regression", "guess: not float"
    squeezed = [dim for dim in first.shape[1:] if dim != 1]
    if first.ndim >= 3 and len(squeezed) >= 2:
        return "map", f"guess: rank {first.ndim} with spatial axes"
    if first.ndim == 2 and first.shape[1] > 1:
        return "classifier", f"guess: scores over {first.shape[1]} classes"
    return "regression", "guess: one value per sample"


def compare_outputs(
    reference: Mapping[str, Sequence[Array]],
    candidate: Mapping[str, Sequence[Array]],
    tolerance: AccuracyTolerance,
    *,
    kinds: Mapping[str, OutputKind] | None = None,
    kind_source: str = "profile",
    rule: Rule = "point",
    input_shapes: Mapping[str, tuple[int, ...]] = {},
) -> ValidationResult:
    """Metrics for every output in `reference` (name -> arrays per feed) and the verdict.

    `kinds` names the kind of some outputs; the others are guessed (`guess_output_kind`).
    """
    confidence = tolerance.confidence
    metrics: list[OutputMetrics] = []
    failures: list[str] = []
    warnings: list[str] = []
    for name, ref_batches in reference.items():
        cand_batches = candidate[name]
        if kinds and name in kinds:
            kind, source = kinds[name], kind_source
        else:
            kind, source = guess_output_kind(name, ref_batches, input_shapes=input_shapes)
        ref = _rows(ref_batches, kind)
        cand = _rows(cand_batches, kind)
        if ref.shape != cand.shape:
            failures.append(f"{name}: shape {list(cand.shape)} differs from {list(ref.shape)}")
            continue
        metric = _measure(name, kind, source, ref, cand, tolerance, confidence)
        metrics.append(metric)
        failures.extend(_check(metric, tolerance, rule))
        if rule == "statistical":
            warnings.extend(_sample_size_warnings(metric, tolerance))
    return ValidationResult(
        outputs=tuple(metrics),
        failures=tuple(failures),
        warnings=tuple(warnings),
        rule=rule,
        confidence=confidence,
    )


def _row_cosines(ref: Array, cand: Array) -> Array:
    ref_norm = np.linalg.norm(ref, axis=1)
    cand_norm = np.linalg.norm(cand, axis=1)
    dots = (ref * cand).sum(axis=1)
    both_zero = (ref_norm == 0) & (cand_norm == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = np.where(both_zero, 1.0, dots / (ref_norm * cand_norm))
    return np.asarray(np.nan_to_num(cosines, nan=0.0), dtype=np.float64)


def _pooled_cosine(dots: Array, ref_energy: Array, cand_energy: Array) -> float:
    total_ref, total_cand = float(ref_energy.sum()), float(cand_energy.sum())
    if total_ref == 0.0 and total_cand == 0.0:
        return 1.0
    if total_ref == 0.0 or total_cand == 0.0:
        return 0.0
    return float(dots.sum() / math.sqrt(total_ref * total_cand))


def _measure(
    name: str,
    kind: OutputKind,
    source: str,
    ref: Array,
    cand: Array,
    tolerance: AccuracyTolerance,
    confidence: float,
) -> OutputMetrics:
    samples = int(ref.shape[0])
    finite = bool(np.isfinite(cand).all())
    diff = ref - cand
    max_abs = float(np.abs(diff).max()) if finite and diff.size else 0.0
    snr = _snr_db(ref, diff, finite=finite)
    dots = (ref * cand).sum(axis=1)
    ref_energy = (ref**2).sum(axis=1)
    cand_energy = (cand**2).sum(axis=1)
    per_sample: list[SampleDistribution] = []
    pooled = ref.shape[1] == 1 or kind in ("map", "state")
    if not finite:
        cosine = lower = 0.0
        max_abs = math.inf
    elif pooled:
        cosine = _pooled_cosine(dots, ref_energy, cand_energy)
        lower = bootstrap_lower_bound(
            lambda idx: _pooled_cosine(dots[idx], ref_energy[idx], cand_energy[idx]),
            samples,
            confidence,
        )
    else:
        cosines = _row_cosines(ref, cand)
        cosine = float(cosines.mean())
        lower = t_lower_bound(cosines, confidence)
        per_sample.append(SampleDistribution.of("cosine", cosines))
    top1 = agree = upper = None
    flipped: tuple[int, ...] = ()
    if kind == "classifier" and ref.shape[1] > 1:
        agrees = ref.argmax(axis=1) == cand.argmax(axis=1)
        agree = int(agrees.sum())
        top1 = agree / samples
        upper = clopper_pearson_upper(agree, samples, confidence)
        flipped = tuple(int(i) for i in np.flatnonzero(~agrees)[:20])
    iou = iou_lower = threshold = None
    if kind == "map" and finite:
        threshold = (
            tolerance.map_threshold
            if tolerance.map_threshold is not None
            else (0.5 if float(ref.min()) >= 0.0 and float(ref.max()) <= 1.0 else 0.0)
        )
        ref_mask, cand_mask = ref > threshold, cand > threshold
        inter = (ref_mask & cand_mask).sum(axis=1).astype(np.float64)
        union = (ref_mask | cand_mask).sum(axis=1).astype(np.float64)

        def pooled_iou(idx: npt.NDArray[np.int64]) -> float:
            total = float(union[idx].sum())
            return 1.0 if total == 0.0 else float(inter[idx].sum()) / total

        iou = pooled_iou(np.arange(samples, dtype=np.int64))
        iou_lower = bootstrap_lower_bound(pooled_iou, samples, confidence)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_image = np.where(union == 0, 1.0, inter / union)
        per_sample.append(SampleDistribution.of("iou", per_image))
        cosines = _row_cosines(ref, cand)
        per_sample.append(SampleDistribution.of("cosine", cosines))
    return OutputMetrics(
        name=name,
        kind=kind,
        kind_source=source,
        rows=samples,
        cosine=cosine,
        cosine_lower_bound=lower,
        max_abs_error=max_abs,
        snr_db=snr,
        top1_agreement=top1,
        finite=finite,
        top1_agree=agree,
        top1_upper_bound=upper,
        flipped_samples=flipped,
        iou=iou,
        iou_lower_bound=iou_lower,
        map_threshold=threshold,
        per_sample=tuple(per_sample),
    )


def _snr_db(ref: Array, diff: Array, *, finite: bool) -> float:
    if not finite:
        return -SNR_CAP_DB
    noise = float((diff**2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return SNR_CAP_DB
    if signal == 0.0:
        return -SNR_CAP_DB
    return min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))


def _check(metric: OutputMetrics, tolerance: AccuracyTolerance, rule: Rule) -> list[str]:
    found = []
    level = f"{tolerance.confidence:.0%}"
    name = metric.name
    if not metric.finite:
        found.append(f"{name}: non-finite values (NaN or Inf)")
        return found
    if rule == "statistical":
        if metric.cosine_lower_bound < tolerance.min_cosine:
            found.append(
                f"{name}: cosine {metric.cosine:.4f} (lower {level} bound "
                f"{metric.cosine_lower_bound:.4f} over {metric.rows} samples) < "
                f"{tolerance.min_cosine}"
            )
    elif metric.cosine < tolerance.min_cosine:
        found.append(f"{name}: cosine {metric.cosine:.4f} < {tolerance.min_cosine}")
    if metric.top1_agreement is not None:
        if rule == "statistical":
            assert metric.top1_upper_bound is not None
            if metric.top1_upper_bound < tolerance.min_top1_agreement:
                found.append(
                    f"{name}: top-1 agreement {metric.top1_agree}/{metric.rows} shows a rate "
                    f"below {tolerance.min_top1_agreement} (upper {level} bound "
                    f"{metric.top1_upper_bound:.4f})"
                )
        elif metric.top1_agreement < tolerance.min_top1_agreement:
            found.append(
                f"{name}: top-1 agreement {metric.top1_agreement:.4f} < "
                f"{tolerance.min_top1_agreement}"
            )
    if metric.iou is not None:
        value = metric.iou_lower_bound if rule == "statistical" else metric.iou
        assert value is not None
        if value < tolerance.min_iou:
            bound = f" (lower {level} bound {value:.4f})" if rule == "statistical" else ""
            found.append(
                f"{name}: mask IoU at {metric.map_threshold:g} {metric.iou:.4f}{bound} < "
                f"{tolerance.min_iou}"
            )
    if tolerance.min_snr_db is not None and metric.snr_db < tolerance.min_snr_db:
        found.append(f"{name}: SNR {metric.snr_db:.1f} dB < {tolerance.min_snr_db} dB")
    if tolerance.max_abs_error is not None and metric.max_abs_error > tolerance.max_abs_error:
        found.append(
            f"{name}: max abs error {metric.max_abs_error:.4g} > {tolerance.max_abs_error}"
        )
    return found


def _sample_size_warnings(metric: OutputMetrics, tolerance: AccuracyTolerance) -> list[str]:
    found = []
    if metric.rows < 2:
        found.append(
            f"{metric.name}: {metric.rows} validation sample: no confidence bound is possible; "
            "give more validation data"
        )
    if metric.top1_agreement is not None:
        needed = samples_to_show_rate(tolerance.min_top1_agreement, tolerance.confidence)
        if needed is not None and metric.rows < needed:
            found.append(
                f"{metric.name}: {metric.rows} validation samples cannot show top-1 agreement >= "
                f"{tolerance.min_top1_agreement} at {tolerance.confidence:.0%} confidence (even "
                f"with no flip; that needs >= {needed}); a candidate is refused only when its "
                "flips show it is worse"
            )
    return found
