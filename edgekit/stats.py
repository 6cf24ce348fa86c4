"""The statistics behind edgekit's decisions, in plain Python (no SciPy on the workstation path).

- `binomial_cdf` and `clopper_pearson_*`: exact binomial tail and one-sided bounds on a rate
  (top-1 agreement: how low or high can the true agreement be, given k of n agreed).
- `t_lower_bound`: one-sided Student-t lower confidence bound on a mean (per-sample cosines).
- `bootstrap_lower_bound`: a seeded percentile bootstrap over samples, for pooled metrics
  (pooled cosine, mask IoU) whose variance has no closed form; the same inputs give the same
  bound on every run.
- `median_interval`: a distribution-free confidence interval for a median from order statistics
  (the sign test), used on paired latency log-ratios: robust to the outliers a loaded machine
  produces.

Every function is deterministic; they are checked against SciPy in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "beta_ppf",
    "binomial_cdf",
    "bootstrap_lower_bound",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "median_interval",
    "quantile_interval",
    "regularized_beta",
    "samples_to_show_rate",
    "t_lower_bound",
    "t_ppf",
]

_EPS = 1e-15


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    # Lentz's method for the continued fraction of the incomplete beta function.
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        result *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _bisect(function: Callable[[float], float], target: float, low: float, high: float) -> float:
    """x in [low, high] with function(x) == target, for a function increasing in x."""
    for _ in range(200):
        middle = 0.5 * (low + high)
        if function(middle) < target:
            low = middle
        else:
            high = middle
        if high - low < 1e-13:
            break
    return 0.5 * (low + high)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of the Beta(a, b) distribution."""
    return _bisect(lambda x: regularized_beta(a, b, x), q, 0.0, 1.0)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    # P(X <= k) = I_{1-p}(n - k, k + 1)
    return regularized_beta(n - k, k + 1, 1.0 - p)


def clopper_pearson_lower(k: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound on a rate after k successes in n trials."""
    if n <= 0 or k <= 0:
        return 0.0
    return beta_ppf(1.0 - confidence, k, n - k + 1)


def clopper_pearson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound on a rate after k successes in n trials."""
    if n <= 0 or k >= n:
        return 1.0
    return beta_ppf(confidence, k + 1, n - k)


def samples_to_show_rate(rate: float, confidence: float) -> int | None:
    """The fewest trials whose perfect record (n of n) shows a true rate >= `rate`.

    With n of n successes the lower bound is (1 - confidence)^(1/n); None when `rate` is 1
    (no finite sample shows a perfect rate).
    """
    if rate <= 0.0:
        return 0
    if rate >= 1.0:
        return None
    return math.ceil(math.log(1.0 - confidence) / math.log(rate) - 1e-12)


def _t_cdf(t: float, dof: float) -> float:
    x = dof / (dof + t * t)
    tail = 0.5 * regularized_beta(dof / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, dof: float) -> float:
    """The q-quantile of Student's t distribution with `dof` degrees of freedom."""
    if q == 0.5:
        return 0.0
    bound = 1.0
    while _t_cdf(bound, dof) < q and bound < 1e12:
        bound *= 2.0
    while _t_cdf(-bound, dof) > q and bound < 1e12:
        bound *= 2.0
    return _bisect(lambda t: _t_cdf(t, dof), q, -bound, bound)


def t_lower_bound(values: Sequence[float] | npt.NDArray[np.float64], confidence: float) -> float:
    """One-sided lower confidence bound on the mean of `values` (Student t).

    With one value there is no spread to estimate: the value itself is returned (callers warn).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan
    mean = float(array.mean())
    if array.size == 1:
        return mean
    spread = float(array.std(ddof=1))
    if spread == 0.0:
        return mean
    return mean - t_ppf(confidence, array.size - 1) * spread / math.sqrt(array.size)


def bootstrap_lower_bound(
    statistic: Callable[[npt.NDArray[np.int64]], float],
    samples: int,
    confidence: float,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> float:
    """Percentile-bootstrap lower bound of `statistic(indices)` over resampled sample indices.

    Seeded: the same data always gives the same bound.
    """
    if samples <= 1:
        return statistic(np.arange(samples, dtype=np.int64))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, samples, size=(resamples, samples), dtype=np.int64)
    values = np.array([statistic(row) for row in draws], dtype=np.float64)
    return float(np.quantile(values, 1.0 - confidence, method="lower"))


def quantile_interval(
    values: Sequence[float] | npt.NDArray[np.float64], q: float, confidence: float
) -> tuple[float, float, float]:
    """(quantile, low, high): a distribution-free two-sided interval for the q-quantile.

    From order statistics: [x_(l), x_(u)] with the number of values below the true quantile
    ~ Binomial(n, q), each tail holding at most (1 - confidence) / 2; an infinite bound when
    too few values leave room for it (p99 needs hundreds of runs).
    """
    array = np.sort(np.asarray(values, dtype=np.float64))
    n = int(array.size)
    if n == 0:
        return math.nan, -math.inf, math.inf
    estimate = float(np.quantile(array, q))
    tail = (1.0 - confidence) / 2.0
    low_index = 0  # 1-based order statistic; 0 means no finite lower bound
    for j in range(1, n + 1):
        if binomial_cdf(j - 1, n, q) <= tail + _EPS:
            low_index = j
        else:
            break
    high_index = 0
    for j in range(n, 0, -1):
        if 1.0 - binomial_cdf(j - 1, n, q) <= tail + _EPS:
            high_index = j
        else:
            break
    low = float(array[low_index - 1]) if low_index else -math.inf
    high = float(array[high_index - 1]) if high_index else math.inf
    return estimate, low, high


def median_interval(
    values: Sequence[float] | npt.NDArray[np.float64], confidence: float
) -> tuple[float, float, float]:
    """(median, low, high): a two-sided distribution-free interval for the median.

    The interval is [x_(j), x_(n-j+1)] with the largest j whose sign-test coverage is at least
    `confidence`; too few values for that coverage give (-inf, inf) bounds.
    """
    array = np.sort(np.asarray(values, dtype=np.float64))
    n = int(array.size)
    if n == 0:
        return math.nan, -math.inf, math.inf
    median = float(np.median(array))
    alpha = 1.0 - confidence
    best = 0
    for j in range(1, n // 2 + 1):
        # Coverage of [x_(j), x_(n-j+1)] is 1 - 2 P(B <= j - 1), B ~ Binomial(n, 1/2).
        if 2.0 * binomial_cdf(j - 1, n, 0.5) <= alpha + _EPS:
            best = j
        else:
            break
    if best == 0:
        return median, -math.inf, math.inf
    return median, float(array[best - 1]), float(array[n - best])
