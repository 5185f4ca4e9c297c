"""Stein's two-stage rule: a fixed number of seeds from a pilot (Stein 1945).

The home of the rule for both its users: the study runs the seeds it plans (``study.seeds``,
:mod:`dora_lab.study.seeds`) and the report states the plan and its interval
(:mod:`dora_lab.report.conclusions`); study and report may not import each other, so the rule sits
below both (import it from here: :mod:`dora_lab.report.power`, the power formulas, only names it).

A pilot of ``n0`` paired differences with sd ``s0`` gives
``n = max(n0, ceil((t_{1-alpha/2, n0-1} s0 / h)^2))`` pairs (at most ``cap``); the interval
``mean_n +- t_{1-alpha/2, n0-1} s0 / sqrt(n)`` (pilot sd, pilot df) has half-width at most ``h`` unless
capped and exact coverage ``1 - alpha`` for normal differences: ``n`` depends on the pilot only through
``s0``, which is independent of every sample mean.

Several comparisons against one reference share one ``n`` (:func:`common_plan`: the largest of their
plans).  That ``n`` is a function of the pilot's sample covariance of the differences, which for
normal data is independent of every mean (pilot and second stage), so each comparison's interval
``mean_n +- t s0_i / sqrt(n)`` keeps its exact coverage and, as ``n`` is at least its own plan, a
half-width at most ``h`` (docs/statistics.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

__all__ = ["ALPHA", "SeedPlan", "common_plan", "stein_half_width", "stein_n"]

ALPHA = 0.05


@dataclass(frozen=True)
class SeedPlan:
    """Stein's fixed sample size from a pilot."""

    n0: int  # pilot pairs
    s0: float  # the pilot differences' sd
    n: int  # the fixed number of pairs of the final analysis (capped)
    capped: bool  # the cap was reached: the final half-width is above the target
    half_width: float  # t_{1-alpha/2, n0-1} s0 / sqrt(n): the final interval's half-width


def stein_half_width(s0: float, n0: int, n: int, alpha: float = ALPHA) -> float:
    """``t_{1-alpha/2, n0-1} s0 / sqrt(n)``: the half-width of Stein's interval over ``n`` pairs."""
    return float(stats.t.ppf(1 - alpha / 2, n0 - 1)) * s0 / math.sqrt(n)


def stein_n(s0: float, n0: int, half_width: float, alpha: float = ALPHA, cap: int = 50) -> SeedPlan:
    """How many pairs the final analysis uses, from a pilot of ``n0`` pairs with sd ``s0``, for a
    two-sided ``1 - alpha`` interval of half-width at most ``half_width``; at most ``cap`` pairs."""
    if n0 < 2 or math.isnan(s0):
        raise ValueError(f"a pilot needs at least 2 pairs with a known sd, got n0={n0}, sd={s0}")
    if not half_width > 0 or cap < n0:
        raise ValueError(f"the target half-width must be > 0 and the cap >= the pilot ({n0}), got "
                         f"{half_width}, {cap}")
    t = float(stats.t.ppf(1 - alpha / 2, n0 - 1))
    wanted = max(n0, math.ceil((t * s0 / half_width) ** 2 - 1e-9))
    n = min(wanted, cap)
    return SeedPlan(n0=n0, s0=s0, n=n, capped=wanted > cap, half_width=t * s0 / math.sqrt(n))


def common_plan(pilots: Mapping[str, Sequence[float]], n0: int, half_width: float, cap: int,
                alpha: float = ALPHA) -> tuple[int, dict[str, SeedPlan]]:
    """One number of seeds for several comparisons: each comparison's Stein plan from its pilot
    differences (``pilots``: comparison -> its differences), then the largest ``n`` (at least
    ``n0``, at most ``cap``).  Each returned plan is at that common ``n`` (its half-width
    ``t s0 / sqrt(n)``; ``capped``: its own plan wanted more than ``cap``).  A comparison with fewer
    than 2 pilot pairs gets no plan (no sd) and does not move ``n``."""
    own = {k: stein_n(statistics.stdev(d), len(d), half_width, alpha, max(cap, len(d)))
           for k, d in pilots.items() if len(d) >= 2}
    n = max([n0, *(p.n for p in own.values())])
    return n, {k: SeedPlan(p.n0, p.s0, n, p.capped, stein_half_width(p.s0, p.n0, n, alpha)) for k, p in own.items()}
