"""Statistics of the paired comparisons: t-intervals, the exact Wilcoxon signed-rank test, binomial errors.

The Wilcoxon test is computed exactly (the full permutation distribution of the signed-rank sum, ties handled by
mid-ranks, zero differences dropped as in Wilcoxon's original method), so it holds for the small numbers of seeds
used here, with or without ties; without ties it equals ``scipy.stats.wilcoxon(..., method="exact")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def t_interval(x: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample SD, standard error and the two-sided t confidence interval of the mean of ``x``."""
    from scipy.stats import t

    a = np.asarray(x, dtype=np.float64)
    n = len(a)
    mean = float(a.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "se": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
    sd = float(a.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * se
    return {"n": n, "mean": mean, "sd": sd, "se": se, "ci95_low": mean - half, "ci95_high": mean + half}


def rank_abs(d: np.ndarray) -> np.ndarray:
    """Ranks 1..n of |d|, tied values sharing the mean of their ranks."""
    a = np.abs(d)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_exact(d: Sequence[float]) -> dict[str, Any]:
    """Two-sided exact Wilcoxon signed-rank test of ``d`` (paired differences) against a median of zero.

    Returns ``w_plus`` (sum of the ranks of the positive differences), ``statistic`` = min(W+, W−) (scipy's),
    ``n`` (non-zero differences) and ``p`` = min(1, 2·min(P(W+ ≤ w), P(W+ ≥ w))) under the null, where each of the
    2^n sign patterns is equally likely. Ranks are doubled to integers and the null distribution counted by dynamic
    programming over the ranks.
    """
    a = np.asarray(d, dtype=np.float64)
    a = a[a != 0]
    n = len(a)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "statistic": 0.0, "p": 1.0}
    r2 = np.rint(2 * rank_abs(a)).astype(np.int64)  # mid-ranks are multiples of 1/2
    total = int(r2.sum())
    counts = np.zeros(total + 1, dtype=np.float64)  # counts[s]: sign patterns whose doubled W+ equals s
    counts[0] = 1.0
    for r in r2:
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[: total + 1 - r]
        counts = counts + shifted
    w2 = int(r2[a > 0].sum())
    probs = counts / counts.sum()
    p_low, p_high = float(probs[: w2 + 1].sum()), float(probs[w2:].sum())
    return {
        "n": n,
        "w_plus": w2 / 2,
        "statistic": min(w2, total - w2) / 2,
        "p": min(1.0, 2 * min(p_low, p_high)),
    }


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a − b per seed: mean, 95 % t-interval and the exact Wilcoxon p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    ci = t_interval(d)
    w = wilcoxon_exact(d)
    return {**ci, "per_seed": d.tolist(), "wilcoxon_p": w["p"], "wilcoxon_statistic": w["statistic"]}


def binomial(successes: int, episodes: int) -> dict[str, float]:
    """Success rate in points and its binomial standard error sqrt(p(1 − p)/n) in points."""
    p = successes / episodes if episodes else math.nan
    return {"pct": 100 * p, "binomial_se_pct": 100 * math.sqrt(p * (1 - p) / episodes) if episodes else math.nan}


def recovery_ratio(meta: float, pre: float, aux: float) -> float:
    """(meta − pre) / (aux − pre): the share of the auxiliary objective's gain that the merged start recovers."""
    return (meta - pre) / (aux - pre) if aux != pre else math.nan
