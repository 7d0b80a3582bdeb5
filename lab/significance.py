"""Whether a difference between two runs' evaluation scores is real: a paired bootstrap confidence interval of the
difference of means over the examples both runs scored, and an exact two-sided sign test for win rates. Pure
numpy and the standard library; tests recompute the figures with scipy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Difference:
    """b's mean minus a's over `n` paired examples, its confidence interval at `level`, and whether the interval
    leaves out zero."""
    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        """"+0.031 ± 0.012, significant" (the half-width of the interval, which may be lopsided)."""
        half = max(self.high - self.mean, self.mean - self.low)
        return f"{self.mean:+.3g} ± {half:.2g}, {'significant' if self.significant else 'not significant'}"


def paired_bootstrap(a: list[float], b: list[float], resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> Difference:
    """The difference of means b - a over paired examples (a[i] and b[i] score the same example), with a
    percentile bootstrap interval: the examples are resampled together, so what both runs find hard cancels."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same examples: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no examples to compare")
    diffs = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    step = max(1, 2_000_000 // len(diffs))  # resamples drawn at a time: a few MB, however many the examples
    means = np.concatenate([diffs[rng.integers(0, len(diffs), size=(min(step, resamples - start), len(diffs)))]
                            .mean(axis=1) for start in range(0, resamples, step)])
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Difference(float(diffs.mean()), float(low), float(high), len(diffs), level)


def sign_test(wins: int, losses: int) -> float:
    """The two-sided p-value of `wins` against `losses` when either is equally likely (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_examples(a: list[dict], b: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """The scores of `metric` for the examples both runs scored, where each has a number: paired by their task
    and doc_id where the rows carry one (eval-harness), else by their position in the evaluation's rows (both ran
    on the same dataset in the same order)."""
    if a and b and all("doc_id" in r for r in a + b):
        theirs = {(r.get("task"), r["doc_id"]): r for r in b}
        pairs = [(x.get(metric), theirs.get((x.get("task"), x["doc_id"]), {}).get(metric)) for x in a]
    else:
        pairs = [(x.get(metric), y.get(metric)) for x, y in zip(a, b, strict=False)]
    kept = [(float(x), float(y)) for x, y in pairs if is_number(x) and is_number(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two scorings of the same things (ties in either counted as scipy does); None where
    either side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    untied_a, untied_b = np.count_nonzero(da), np.count_nonzero(db)
    if untied_a == 0 or untied_b == 0:
        return None
    return float((da * db).sum() / math.sqrt(untied_a * untied_b))


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: the correlation of the two scorings' ranks (ties share their mean rank); None where either
    side is constant."""
    a, b = _ranks(x), _ranks(y)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(values: list[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):  # ties share the mean of their ranks
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks
