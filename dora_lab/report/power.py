"""How large a difference a paired comparison could detect, and how many seeds a stated effect needs.

All for the two-sided paired t-test of ``mean(x - y) = 0`` at level ``alpha`` over ``n`` pairs
whose differences have standard deviation ``sd`` (the observed one, taken as the truth):

- :func:`paired_power`: the exact power at a true mean difference ``delta``, from the noncentral
  t distribution (:data:`scipy.stats.nct`): with ``df = n - 1``, ``c = t_{1-alpha/2, df}`` and
  noncentrality ``ncp = delta sqrt(n) / sd``, power ``= P(T > c) + P(T < -c)``, ``T ~ nct(df, ncp)``.
- :func:`min_detectable_difference`: the ``delta > 0`` whose power is ``power`` (0.8 by default),
  solved by root finding on the exact power (for large ``n`` it tends to the normal
  approximation ``(z_{1-alpha/2} + z_{power}) sd / sqrt(n)``; at ``n = 3`` it is 2.0 times that, at ``n = 5`` 1.34 times).
- :func:`seeds_needed`: the smallest ``n >= 2`` whose power at ``delta = effect`` reaches ``power``.
- :func:`~dora_lab.track.seed_plan.stein_n` (not here: its home is :mod:`dora_lab.track.seed_plan`, which
  the study's ``study.seeds`` uses too): the fixed number of seeds from a pilot (Stein's two-stage rule, 1945): a pilot of
  ``n0`` pairs with sd ``s0`` gives ``n = max(n0, ceil((t_{1-alpha/2, n0-1} s0 / h)^2))`` (capped);
  the final interval ``mean_n +- t_{1-alpha/2, n0-1} s0 / sqrt(n)`` (pilot sd, pilot df) has half-width
  at most ``h`` and exact coverage ``1 - alpha`` for normal differences, because ``n`` depends on
  the pilot only through ``s0``, which is independent of every sample mean.

>>> seeds_needed(0.5, 1.0)  # G*Power's one-sample t, d = 0.5, alpha 0.05, power 0.8: N = 34
34
"""

from __future__ import annotations

import math

from scipy import optimize, stats

__all__ = ["POWER", "min_detectable_difference", "paired_power", "seeds_needed"]

POWER = 0.8
ALPHA = 0.05
NAN = float("nan")


def paired_power(delta: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided paired t-test with ``n`` pairs at a true mean difference ``delta``."""
    if n < 2 or not sd > 0:
        return NAN
    df = n - 1
    c = float(stats.t.ppf(1 - alpha / 2, df))
    ncp = abs(delta) * math.sqrt(n) / sd
    upper, lower = float(stats.nct.sf(c, df, ncp)), float(stats.nct.cdf(-c, df, ncp))
    # far in the tails scipy's nct can give NaN: there the lower tail is ~0 and, past c, the upper ~1
    lower = 0.0 if math.isnan(lower) else lower
    upper = 1.0 if math.isnan(upper) and ncp > c + 10 else upper
    return upper + lower


def min_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean difference the two-sided paired t-test detects with probability ``power``
    (in the metric's units; NaN below 2 pairs or without an sd, 0 when every difference is equal)."""
    if n < 2 or math.isnan(sd):
        return NAN
    if sd == 0:
        return 0.0
    if not alpha < power < 1:
        raise ValueError(f"power must lie between alpha ({alpha}) and 1, got {power}")
    normal = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / math.sqrt(n)
    high = normal
    while paired_power(high, sd, n, alpha) < power:  # at n = 2 the exact value is ~6x the normal one
        high *= 2
    return float(optimize.brentq(lambda d: paired_power(d, sd, n, alpha) - power, 0.0, high, xtol=1e-12 * high,
                                 rtol=1e-12))


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER, cap: int = 100_000) -> int:
    """The fewest pairs (seeds) whose paired t-test detects a true mean difference ``effect`` with
    probability ``power``, given the differences' ``sd``; ``cap + 1`` when even ``cap`` is too few."""
    if not effect != 0 or math.isnan(sd) or math.isnan(effect):
        raise ValueError(f"seeds_needed: the effect must be a non-zero number and sd known, got {effect}, {sd}")
    if sd == 0:
        return 2
    low, high = 2, 2
    while paired_power(effect, sd, high, alpha) < power:  # doubling, then bisection: few evaluations
        if high >= cap:
            return cap + 1
        low, high = high + 1, min(2 * high, cap)
    while low < high:  # the power grows with n
        mid = (low + high) // 2
        if paired_power(effect, sd, mid, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return low
