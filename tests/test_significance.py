"""lab.significance against scipy: the paired bootstrap interval and the sign test."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as scipy_stats

from lab import significance


def test_the_paired_bootstrap_matches_scipys_on_the_differences():
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.2, 300)
    b = a + rng.normal(0.03, 0.05, 300)  # better on most examples, by a little
    got = significance.paired_bootstrap(list(a), list(b), resamples=4000)
    ref = scipy_stats.bootstrap(((b - a),), np.mean, n_resamples=4000, method="percentile", random_state=2,
                                confidence_level=0.95).confidence_interval
    assert got.mean == pytest.approx(float(np.mean(b - a)))
    assert got.low == pytest.approx(ref.low, abs=0.003) and got.high == pytest.approx(ref.high, abs=0.003)
    assert got.significant and got.text().endswith(", significant")


def test_a_difference_within_the_noise_is_not_significant():
    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 0.2, 50)
    b = a + rng.normal(0.0, 0.2, 50)
    got = significance.paired_bootstrap(list(a), list(b))
    assert got.low < 0 < got.high and not got.significant and got.text().endswith("not significant")


@pytest.mark.parametrize(("wins", "losses"), [(0, 0), (5, 5), (9, 1), (30, 12), (0, 7), (100, 80)])
def test_the_sign_test_matches_scipys_binomial_test(wins, losses):
    expected = 1.0 if wins + losses == 0 else scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
    assert significance.sign_test(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_examples_are_paired_by_position_and_only_numbers_count():
    a = [{"acc": 1.0}, {"acc": 0.0}, {"acc": None}, {"acc": 1}]
    b = [{"acc": 0.0}, {"acc": 1.0}, {"acc": 1.0}, {"acc": float("nan")}]
    assert significance.paired_examples(a, b, "acc") == ([1.0, 0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="same examples"):
        significance.paired_bootstrap([1.0], [1.0, 2.0])


def test_rank_correlations_match_scipys_with_ties_and_none_when_a_side_is_constant():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 12):
        for _ in range(20):
            x = list(rng.integers(0, 4, n).astype(float))  # ties likely
            y = list(rng.normal(size=n).round(1))
            if len(set(x)) < 2 or len(set(y)) < 2:
                assert significance.kendall_tau(x, y) is None and significance.spearman(x, y) is None
                continue
            assert significance.kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
            assert significance.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert significance.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert significance.spearman([1, 2], [1, 2]) == pytest.approx(1.0)
