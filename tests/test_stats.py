"""The report's statistics against hand-worked numbers (closed forms, tabled quantiles, enumerations)."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

import dora_lab.report.stats
from dora_lab.report.stats import (
    describe,
    holm,
    kendall_tau,
    paired_test,
    sign_flip_p,
    t_interval,
    top_k_overlap,
)

T_975_DF2 = 4.302652729911275  # the tabled two-sided 95% quantiles of Student's t
T_975_DF3 = 3.182446305284263


def test_describe_three_values() -> None:
    s = describe([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd, s.min, s.max) == (3, 2.0, 1.0, 1.0, 3.0)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # t * sd / sqrt(n)
    assert s.ci_low == pytest.approx(2.0 - half, abs=1e-9) and s.ci_high == pytest.approx(2.0 + half, abs=1e-9)
    assert s.ci_high == pytest.approx(4.4841, abs=1e-4)


def test_one_value_has_no_spread() -> None:
    s = describe([0.5])
    assert s.mean == 0.5 and math.isnan(s.sd) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert all(math.isnan(v) for v in t_interval([]))
    with pytest.raises(ValueError, match="at least one"):
        describe([])


def test_paired_test_by_hand() -> None:
    # d = x - y = [0.03, 0.01, 0.04, 0.02]: mean 0.025, sd sqrt(0.0005 / 3), t = sqrt(15) with 3 df
    x, y = [0.60, 0.55, 0.62, 0.58], [0.57, 0.54, 0.58, 0.56]
    r = paired_test(x, y)
    sd = math.sqrt(0.0005 / 3)
    se = sd / math.sqrt(4)
    assert r.n == 4 and r.df == 3
    assert r.mean_diff == pytest.approx(0.025) and r.sd_diff == pytest.approx(sd)
    assert r.t == pytest.approx(math.sqrt(15))
    # Student's t with 3 df has a closed-form CDF: F(t) = 1/2 + (u / (1 + u^2) + atan(u)) / pi, u = t / sqrt(3)
    u = math.sqrt(15) / math.sqrt(3)
    p = 2 * (1 - (0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi))
    assert p == pytest.approx(0.030466, abs=1e-6)
    assert r.p_t == pytest.approx(p, rel=1e-9)
    assert r.ci_low == pytest.approx(0.025 - T_975_DF3 * se) and r.ci_high == pytest.approx(0.025 + T_975_DF3 * se)
    assert r.ci_low == pytest.approx(0.004458, abs=1e-6)
    # every difference positive: only "all +" and "all -" are as extreme, 2 of 2^4
    assert r.p_sign_flip == pytest.approx(2 / 16)
    assert paired_test(y, x).mean_diff == pytest.approx(-0.025) and paired_test(y, x).p_t == pytest.approx(p)


def test_sign_flip_enumerated() -> None:
    # d = [1, -2, 3], |sum| = 2; the 8 sign patterns give |sums| 6 0 2 4 4 2 0 6: six are >= 2
    assert sign_flip_p([1.0, -2.0, 3.0]) == pytest.approx(6 / 8)
    assert sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # the floor with 3 seeds: 0.25
    assert math.isnan(sign_flip_p([1.0] * 21)) and math.isnan(sign_flip_p([1.0] * 11, max_exact=10))
    assert sign_flip_p([1.0] * 11, max_exact=12) == pytest.approx(2 / 2**11)
    assert sign_flip_p([1.0] * 16) == pytest.approx(2 / 2**16) and sign_flip_p([0.5]) == pytest.approx(1.0)
    # the two-half tables against the 2^n sign vectors one by one, on odd and even n
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 12):
        d = rng.normal(0.01, 0.03, n)
        brute = [abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= abs(d.sum()) - 1e-12
                 for signs in itertools.product((1, -1), repeat=n)]
        assert sign_flip_p(d) == pytest.approx(sum(brute) / 2**n), n


def test_paired_test_degenerate_cases() -> None:
    same = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same.mean_diff == 0.0 and same.p_t == 1.0 and same.t == 0.0 and same.p_sign_flip == 1.0
    shifted = paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # identical differences: t undefined
    assert shifted.mean_diff == pytest.approx(0.1) and math.isinf(shifted.t) and math.isnan(shifted.p_t)
    single = paired_test([0.6], [0.5])
    assert single.mean_diff == pytest.approx(0.1) and math.isnan(single.p_t) and math.isnan(single.ci_low)
    with pytest.raises(ValueError, match="equally long"):
        paired_test([1.0, 2.0], [1.0])


def test_holm_on_known_p_values() -> None:
    # sorted 0.005 0.01 0.03 0.04 -> x4 x3 x2 x1 = 0.02 0.03 0.06 0.04 -> running max 0.02 0.03 0.06 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    capped = holm([0.5, float("nan"), 0.6])  # NaN does not count: m = 2
    assert capped[0] == 1.0 and math.isnan(capped[1]) and capped[2] == 1.0
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_kendall_tau_over_all_layers() -> None:
    # b lists its layers in another order: the components are matched by (layer, index), not position
    a = {"l0": [0.9, 0.1, 0.5], "l1": [0.8, 0.3]}
    b = {"l1": [0.2, 0.7], "l0": [0.6, 0.95, 0.1]}
    x, y = [0.9, 0.1, 0.5, 0.8, 0.3], [0.6, 0.95, 0.1, 0.2, 0.7]
    assert kendall_tau(a, b) == pytest.approx(float(sps.kendalltau(x, y).statistic))
    # by hand, no ties: (1,2,3,4) vs (1,3,2,4) has 5 concordant pairs and 1 discordant: (5 - 1) / 6
    assert kendall_tau({"l": [1, 2, 3, 4]}, {"l": [1, 3, 2, 4]}) == pytest.approx(2 / 3)
    assert kendall_tau(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different components"):
        kendall_tau(a, {"l0": [0.1, 0.2, 0.3]})


def test_top_k_overlap_by_hand() -> None:
    a = {"l0": [0.9, 0.1, 0.5], "l1": [0.8, 0.3]}
    b = {"l1": [0.2, 0.7], "l0": [0.6, 0.95, 0.1]}
    # top-2: a {l0.0, l1.0}, b {l0.1, l1.1}: none shared; top-3 adds l0.2 and l0.0: one shared
    assert top_k_overlap(a, b, 2) == 0.0
    assert top_k_overlap(a, b, 3) == pytest.approx(1 / 3)
    assert top_k_overlap(a, b, 5) == 1.0
    # ties are broken by position, as the pruning controller's stable sort does: l0.0 before l0.1
    assert top_k_overlap({"l0": [1.0, 1.0, 0.0]}, {"l0": [1.0, 0.0, 0.5]}, 1) == 1.0
    with pytest.raises(ValueError, match="k must be in 1..5"):
        top_k_overlap(a, b, 0)


def test_t_interval_covers_at_the_nominal_rate() -> None:
    """A check of the interval as a procedure: on normal samples of 3 it covers the mean ~95% of the time."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        low, high = t_interval(rng.normal(1.0, 2.0, size=3))
        hits += low <= 1.0 <= high
    assert hits / 4000 == pytest.approx(0.95, abs=0.012)


def test_docstring_examples() -> None:
    assert doctest.testmod(dora_lab.report.stats).failed == 0
