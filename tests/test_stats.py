"""The hand-written statistics against SciPy (a dev-only dependency through scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from scipy import stats as reference

from edgekit import stats


@pytest.mark.parametrize(("a", "b", "x"), [(0.5, 0.5, 0.2), (2.5, 3.5, 0.3), (50, 3, 0.97)])
def test_regularized_beta(a: float, b: float, x: float) -> None:
    assert stats.regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-9)


@pytest.mark.parametrize(("k", "n", "p"), [(6, 7, 0.98), (0, 10, 0.5), (95, 100, 0.98)])
def test_binomial_cdf(k: int, n: int, p: float) -> None:
    assert stats.binomial_cdf(k, n, p) == pytest.approx(reference.binom.cdf(k, n, p), rel=1e-9)


@pytest.mark.parametrize(("k", "n"), [(6, 7), (7, 7), (0, 5), (140, 149)])
def test_clopper_pearson_bounds(k: int, n: int) -> None:
    upper = 1.0 if k == n else reference.beta.ppf(0.95, k + 1, n - k)
    lower = 0.0 if k == 0 else reference.beta.ppf(0.05, k, n - k + 1)
    assert stats.clopper_pearson_upper(k, n, 0.95) == pytest.approx(upper, abs=1e-9)
    assert stats.clopper_pearson_lower(k, n, 0.95) == pytest.approx(lower, abs=1e-9)


def test_samples_to_show_rate() -> None:
    needed = stats.samples_to_show_rate(0.98, 0.95)
    assert needed == 149
    assert stats.clopper_pearson_lower(149, 149, 0.95) >= 0.98
    assert stats.clopper_pearson_lower(148, 148, 0.95) < 0.98


@pytest.mark.parametrize(("q", "dof"), [(0.95, 6), (0.975, 1), (0.05, 30), (0.99, 120)])
def test_t_quantiles(q: float, dof: int) -> None:
    assert stats.t_ppf(q, dof) == pytest.approx(reference.t.ppf(q, dof), rel=1e-8)


def test_t_lower_bound_matches_the_textbook_interval() -> None:
    values = np.random.default_rng(0).normal(0.99, 0.01, size=12)
    expected = reference.t.interval(0.90, 11, loc=values.mean(), scale=reference.sem(values))[0]
    assert stats.t_lower_bound(values, 0.95) == pytest.approx(expected, rel=1e-9)


def test_median_interval_covers_the_sign_test_order_statistics() -> None:
    median, low, high = stats.median_interval(np.arange(20.0), 0.95)
    assert (median, low, high) == (9.5, 5.0, 14.0)
    coverage = 1 - 2 * reference.binom.cdf(5 - 1, 20, 0.5)
    assert coverage >= 0.95
    assert stats.median_interval([1.0, 2.0, 3.0], 0.95)[1] == -np.inf  # too few for 95%


def test_bootstrap_is_seeded() -> None:
    values = np.random.default_rng(1).random(30)

    def mean(indices: np.ndarray) -> float:
        return float(values[indices].mean())

    first = stats.bootstrap_lower_bound(mean, 30, 0.95)
    assert first == stats.bootstrap_lower_bound(mean, 30, 0.95)
    assert first < values.mean()
