"""The statistics of an ablation report, for the few seeds a fine-tuning ablation can afford.

- :func:`describe`: n, mean, sample standard deviation (``ddof=1``), a two-sided Student-t
  confidence interval for the mean, ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)``, min and max.
- :func:`paired_test`: differences ``x - y`` paired by seed; their mean, a t-interval for it, the
  paired t-test (:func:`scipy.stats.ttest_rel`, two-sided) and, as a check that does not assume
  normal differences, the exact two-sided sign-flip permutation p-value (:func:`sign_flip_p`).
- :func:`stratified_paired_test`: one paired comparison over several tasks (strata) x seeds: the
  equally weighted mean of the per-task mean differences, its Welch-Satterthwaite t (see there).
- :func:`holm`: Holm's step-down adjustment of several p-values (family-wise error rate).
- :func:`kendall_tau` and :func:`top_k_overlap`: how alike two scorers rank the same components;
  scores are ``{layer: [score of each original component]}`` as in a run's ``scores.json``.

>>> round(describe([1.0, 2.0, 3.0]).ci_high, 4)  # 2 + t(0.975, 2) * 1 / sqrt(3)
4.4841
>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "CONFIDENCE",
    "PairedTest",
    "StratifiedTest",
    "Summary",
    "aligned_scores",
    "describe",
    "holm",
    "kendall_tau",
    "paired_test",
    "sign_flip_p",
    "stratified_paired_test",
    "t_interval",
    "top_k_overlap",
]

CONFIDENCE = 0.95
NAN = float("nan")


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1 in the denominator); NaN for n < 2
    ci_low: float  # Student-t interval for the mean at CONFIDENCE; NaN for n < 2
    ci_high: float
    min: float
    max: float


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean of ``values`` (NaN, NaN for fewer than two)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return NAN, NAN
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean()) - half, float(x.mean()) + half


def describe(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("describe() needs at least one value")
    low, high = t_interval(x, confidence)
    return Summary(n=int(x.size), mean=float(x.mean()), sd=float(x.std(ddof=1)) if x.size > 1 else NAN,
                   ci_low=low, ci_high=high, min=float(x.min()), max=float(x.max()))


@dataclass(frozen=True)
class PairedTest:
    n: int  # pairs
    mean_diff: float  # mean of x - y
    sd_diff: float
    ci_low: float  # t-interval for the mean difference
    ci_high: float
    t: float
    df: int
    p_t: float  # paired t-test, two-sided; NaN when undefined (n < 2, or all differences equal and not 0)
    p_sign_flip: float  # exact sign-flip permutation p, two-sided; NaN when n > max_exact


def sign_flip_p(diffs: Sequence[float], max_exact: int = 20) -> float:
    """Exact two-sided sign-flip p-value of ``mean(diffs) = 0``: the share of the ``2^n`` sign
    assignments whose ``|mean|`` is at least the observed one.  Its smallest possible value is
    ``2 / 2^n`` (0.25 for 3 pairs), whatever the data.  NaN when ``n > max_exact`` or ``n = 0``.
    The ``2^n`` sums are every sum of one half's signed sums and the other's (two tables of
    ``2^(n/2)``, 8 MB at n = 20)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0 or d.size > max_exact:
        return NAN
    observed = abs(float(d.sum()))
    head, tail = d[: d.size // 2], d[d.size // 2:]
    sums = np.abs(_signed_sums(head)[:, None] + _signed_sums(tail)[None, :])
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # ties up to float rounding count as "as extreme"
    return float(np.mean(sums >= observed - tol))


def _signed_sums(d: np.ndarray) -> np.ndarray:
    """``sum_i s_i d_i`` for every sign vector ``s`` in ``{+1, -1}^n`` (``[0.0]`` when ``n = 0``)."""
    if d.size == 0:
        return np.zeros(1)
    return np.array(list(itertools.product((1.0, -1.0), repeat=d.size))) @ d


def paired_test(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE,
                max_exact: int = 20) -> PairedTest:
    """Compare ``x`` with ``y`` pair by pair (``x[i]`` and ``y[i]`` from the same seed)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two equally long lists, got {a.shape} and {b.shape}")
    d = a - b
    n = int(d.size)
    if n == 0:
        raise ValueError("paired_test() needs at least one pair")
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else NAN
    low, high = t_interval(d, confidence)
    if n < 2:
        t, p = NAN, NAN
    elif sd <= 1e-12 * max(1.0, float(np.abs(d).max())):  # every difference equal (up to rounding)
        t, p = (0.0, 1.0) if abs(mean) <= 1e-12 else (math.copysign(math.inf, mean), NAN)
    else:
        res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    return PairedTest(n=n, mean_diff=mean, sd_diff=sd, ci_low=low, ci_high=high, t=t, df=n - 1, p_t=p,
                      p_sign_flip=sign_flip_p(d, max_exact))


@dataclass(frozen=True)
class StratifiedTest:
    strata: int  # tasks
    n: int  # pairs over all tasks
    mean_diff: float  # the mean over tasks of each task's mean difference (every task weighs the same)
    se: float
    ci_low: float
    ci_high: float
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom (not an integer)
    p_t: float


def stratified_paired_test(strata: Sequence[tuple[Sequence[float], Sequence[float]]],
                           confidence: float = CONFIDENCE) -> StratifiedTest:
    """Paired differences over several tasks, tested as one effect: the average over the ``K`` tasks
    of task ``k``'s mean difference ``m_k`` (``n_k`` seeds, sd ``s_k``), ``D = sum(m_k) / K``, with
    ``var(D) = sum(v_k) / K^2``, ``v_k = s_k^2 / n_k`` and the Welch-Satterthwaite degrees of
    freedom ``(sum v_k)^2 / sum(v_k^2 / (n_k - 1))``; two-sided t-test and t-interval.  Stratified,
    not pooled: the tasks' metrics differ in scale and spread (MCC on CoLA, accuracy on SST-2), so
    each task keeps its own variance and counts once whatever its seeds.  With one task it is the
    paired t-test exactly.  Every task needs 2 pairs or more (NaN otherwise)."""
    diffs = [np.asarray(x, dtype=float) - np.asarray(y, dtype=float) for x, y in strata]
    k, n = len(diffs), sum(int(d.size) for d in diffs)
    if k == 0 or any(d.size < 2 for d in diffs):
        return StratifiedTest(k, n, _mean_of([float(d.mean()) for d in diffs if d.size]), NAN, NAN, NAN, NAN, NAN,
                              NAN)
    v = np.array([d.var(ddof=1) / d.size for d in diffs])
    mean = float(np.mean([d.mean() for d in diffs]))
    se = float(math.sqrt(v.sum()) / k)
    if se <= 1e-15:
        return StratifiedTest(k, n, mean, se, mean, mean, NAN, NAN, NAN)
    df = float(v.sum() ** 2 / sum(vk ** 2 / (d.size - 1) for vk, d in zip(v, diffs, strict=True)))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    t = mean / se
    return StratifiedTest(k, n, mean, se, mean - half, mean + half, t, df, float(2 * stats.t.sf(abs(t), df)))


def _mean_of(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else NAN


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sort ascending, multiply the i-th
    smallest (from 0) by ``m - i``, make the sequence non-decreasing, cap at 1.  NaNs stay NaN
    and do not count in ``m``."""
    p = [float(v) for v in pvalues]
    order = sorted((i for i, v in enumerate(p) if not math.isnan(v)), key=lambda i: p[i])
    m = len(order)
    out = [NAN] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def aligned_scores(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]) -> tuple[
        np.ndarray, np.ndarray]:
    """Both score maps as flat vectors over the same components, in ``a``'s layer order (the
    controller's order, which breaks ties).  The two must cover the same layers and ranks."""
    if set(a) != set(b) or any(len(a[k]) != len(b[k]) for k in a):
        diff = sorted(set(a) ^ set(b))[:3] or [k for k in a if len(a[k]) != len(b[k])][:3]
        raise ValueError(f"the two runs scored different components (first differences: {diff})")
    return (np.concatenate([np.asarray(a[k], dtype=float) for k in a]),
            np.concatenate([np.asarray(b[k], dtype=float) for k in a]))


def kendall_tau(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]) -> float:
    """Kendall's tau-b (:func:`scipy.stats.kendalltau`) over all components of all layers."""
    x, y = aligned_scores(a, b)
    return float(stats.kendalltau(x, y).statistic)


def top_k_overlap(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], k: int) -> float:
    """Share of the ``k`` highest-scored components (over all layers, ties broken by position as
    the controller does) that both rankings keep: ``|top_k(a) & top_k(b)| / k``."""
    x, y = aligned_scores(a, b)
    if not 0 < k <= x.size:
        raise ValueError(f"k must be in 1..{x.size} (the number of components), got {k}")
    top_x = set(np.argsort(-x, kind="stable")[:k].tolist())
    top_y = set(np.argsort(-y, kind="stable")[:k].tolist())
    return len(top_x & top_y) / k
