"""Power, minimum detectable difference, Stein's fixed n and the stratified test, each against an
independent computation: G*Power's tabled sample sizes, the normal closed form at large n, Monte-Carlo
simulations of the t-test itself, and hand-worked cases."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy import stats as sps

import dora_lab.report.power
from dora_lab.report.power import min_detectable_difference, paired_power, seeds_needed
from dora_lab.report.stats import paired_test, stratified_paired_test
from dora_lab.track.seed_plan import stein_n


def test_doctests() -> None:
    assert doctest.testmod(dora_lab.report.power).failed == 0


def test_seeds_needed_matches_gpower_tables() -> None:
    # G*Power 3, "t tests - Means: difference from constant (one sample case)", two tails, alpha 0.05,
    # power 0.80: effect size d = 0.5 -> total sample size 34; d = 0.8 -> 15; d = 0.3 -> 90
    assert seeds_needed(0.5, 1.0) == 34 and seeds_needed(0.8, 1.0) == 15 and seeds_needed(0.3, 1.0) == 90
    assert seeds_needed(0.01, 0.02) == 34  # only d = effect / sd matters
    assert seeds_needed(-0.01, 0.02) == 34  # two-sided
    assert seeds_needed(1e-4, 1.0, cap=1000) == 1001  # beyond the cap
    with pytest.raises(ValueError, match="non-zero"):
        seeds_needed(0.0, 1.0)


def test_power_at_zero_is_the_size_and_grows_with_n() -> None:
    assert paired_power(0.0, 1.0, 5) == pytest.approx(0.05, abs=1e-12)
    assert paired_power(0.5, 1.0, 33) < 0.8 <= paired_power(0.5, 1.0, 34)
    assert math.isnan(paired_power(0.5, 1.0, 1))


def test_mdd_tends_to_the_normal_closed_form() -> None:
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)  # 2.8016
    for n in (2_000, 20_000):
        assert min_detectable_difference(0.03, n) == pytest.approx(z * 0.03 / math.sqrt(n), rel=1e-3)
    # few seeds: the t-test's heavier tails make the MDD much larger than the normal formula
    assert min_detectable_difference(1.0, 3) / (z / math.sqrt(3)) == pytest.approx(2.018, abs=1e-3)
    assert min_detectable_difference(0.0, 5) == 0.0 and math.isnan(min_detectable_difference(0.02, 1))


@pytest.mark.parametrize("n", [3, 5, 10])
def test_mdd_is_detected_80_percent_of_the_time_in_simulation(n: int) -> None:
    """Draw paired differences with mean = MDD and the given sd; the paired t-test must reject
    mean 0 at the 5% level in 80% of the replicates (4 standard errors of the simulation)."""
    sd, reps = 0.03, 40_000
    mdd = min_detectable_difference(sd, n)
    d = np.random.default_rng(n).normal(mdd, sd, size=(reps, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    rate = float(np.mean(2 * sps.t.sf(np.abs(t), n - 1) < 0.05))
    assert rate == pytest.approx(0.8, abs=4 * math.sqrt(0.16 / reps))


def test_stein_n_by_hand() -> None:
    t2 = sps.t.ppf(0.975, 2)  # 4.3027
    plan = stein_n(0.01, 3, 0.02)  # (4.3027 * 0.5)^2 = 4.63 -> 5
    assert (plan.n, plan.capped) == (5, False) and plan.half_width == pytest.approx(t2 * 0.01 / math.sqrt(5))
    plan = stein_n(0.02, 3, 0.01, cap=50)  # (4.3027 * 2)^2 = 74.05 -> 75 > 50
    assert (plan.n, plan.capped) == (50, True) and plan.half_width > 0.01
    assert stein_n(0.001, 4, 0.02).n == 4  # never fewer than the pilot
    with pytest.raises(ValueError, match="pilot"):
        stein_n(0.01, 1, 0.02)


def test_stein_interval_covers_and_is_narrow_in_simulation() -> None:
    """Stein's two-stage rule: pilot of 3, n from its sd, final interval with the pilot's sd and df.
    Coverage 95% (exact for normal data) and half-width at most the target, by simulation."""
    rng, reps, n0, h, mu = np.random.default_rng(7), 20_000, 3, 0.5, 0.1
    t = sps.t.ppf(0.975, n0 - 1)
    covered = 0
    for _ in range(reps):
        pilot = rng.normal(mu, 1.0, n0)
        plan = stein_n(float(pilot.std(ddof=1)), n0, h, cap=10_000)
        total = pilot.sum() + rng.normal(0.0, 1.0, plan.n - n0).sum() + mu * (plan.n - n0)
        assert plan.half_width <= h + 1e-12 and plan.half_width == pytest.approx(t * plan.s0 / math.sqrt(plan.n))
        covered += abs(total / plan.n - mu) <= plan.half_width
    assert covered / reps == pytest.approx(0.95, abs=4 * math.sqrt(0.95 * 0.05 / reps))


def test_stratified_test_is_the_paired_test_for_one_task() -> None:
    x, y = [0.60, 0.55, 0.62, 0.58], [0.57, 0.54, 0.58, 0.56]
    s, p = stratified_paired_test([(x, y)]), paired_test(x, y)
    assert (s.strata, s.n, s.df) == (1, 4, pytest.approx(3.0))
    assert (s.mean_diff, s.t, s.p_t, s.ci_low) == (pytest.approx(p.mean_diff), pytest.approx(p.t),
                                                   pytest.approx(p.p_t), pytest.approx(p.ci_low))


def test_stratified_test_two_tasks_by_hand() -> None:
    # task A: d = [0.03, 0.01, 0.04, 0.02] (mean 0.025, var 0.0005/3, n 4);
    # task B: d = [0.1, 0.0, 0.2] (mean 0.1, var 0.01, n 3): D = 0.0625
    a = ([0.03, 0.01, 0.04, 0.02], [0.0] * 4)
    b = ([0.6, 0.5, 0.7], [0.5, 0.5, 0.5])
    va, vb = 0.0005 / 3 / 4, 0.01 / 3
    se = math.sqrt(va + vb) / 2
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    s = stratified_paired_test([a, b])
    assert s.mean_diff == pytest.approx(0.0625) and s.se == pytest.approx(se) and s.df == pytest.approx(df)
    assert s.p_t == pytest.approx(2 * sps.t.sf(0.0625 / se, df))
    # the pooled t over all 7 differences would weigh task B's 3 seeds less than A's 4 and mix scales
    assert math.isnan(stratified_paired_test([a, ([0.1], [0.0])]).p_t)  # a task with one seed: no variance
