"""``study.seeds``: a grid study that plans its seeds from a pilot (Stein's two-stage rule) and runs them.

The rule against a hand-worked case (t from scipy), its coverage with one common ``n`` for several
comparisons by simulation, and end to end on the tiny BERT with real SQLite Optuna and MLflow stores:
the pilot's sd forces extra seeds, every arm runs exactly the planned ``N``, the cap binds and the
report says so, and a restarted study adds nothing twice.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import test_report
from scipy import stats as sps

from dora_lab.plan.setup import parse_study
from dora_lab.run.config_yaml import ConfigError
from dora_lab.studies import main as study_main
from dora_lab.study.seeds import PLAN_ATTR
from dora_lab.track.seed_plan import common_plan, stein_n

REPO = Path(__file__).resolve().parents[1]
ABLATION = str(REPO / "studies" / "ablation_scorer.yaml")
env = test_report.env  # the tiny BERT initialised wide (runs differ by seed), its own output folder
ARMS = "study.space={scorer.name: {type: categorical, choices: [magnitude, sensitivity]}}"


def test_common_plan_by_hand() -> None:
    t2 = sps.t.ppf(0.975, 2)  # 4.3027
    # a: d = [0.01, 0.03, 0.02], sd 0.01: (4.3027 * 0.01 / 0.02)^2 = 4.63 -> 5
    # b: d = [0.0, 0.05, -0.02], mean 0.01, squares 1e-4 + 16e-4 + 9e-4 = 26e-4 over 2: sd 0.036056;
    #    (4.3027 * 0.036056 / 0.02)^2 = 60.17 -> 61
    pilots = {"a": [0.01, 0.03, 0.02], "b": [0.0, 0.05, -0.02]}
    n, plans = common_plan(pilots, 3, 0.02, cap=100)
    assert n == 61 and plans["b"].s0 == pytest.approx(math.sqrt(0.0013))
    assert plans["a"].half_width == pytest.approx(t2 * 0.01 / math.sqrt(61))  # a's interval at the common n
    assert not plans["a"].capped and not plans["b"].capped
    n, plans = common_plan(pilots, 3, 0.02, cap=10)  # b wants 61: the cap binds, b's interval stays wide
    assert n == 10 and plans["b"].capped and plans["b"].half_width == pytest.approx(t2 * math.sqrt(0.0013) / math.sqrt(10))
    assert plans["b"].half_width > 0.02 >= plans["a"].half_width
    n, plans = common_plan({"a": [0.01, 0.03, 0.02], "c": [0.5]}, 3, 0.02, cap=10)  # c: one pair, no sd
    assert n == stein_n(0.01, 3, 0.02).n == 5 and set(plans) == {"a"}
    assert common_plan({"c": [0.5]}, 3, 0.02, cap=10)[0] == 3  # nothing to plan from: the pilot


def test_one_n_for_every_comparison_keeps_steins_coverage() -> None:
    """2,000 simulated studies, two arms against one reference (their differences correlated through
    the reference's noise, with different sds), pilot 3, n the larger of the two Stein plans: each
    comparison's interval mean_n +- t(0.975, 2) s0 / sqrt(n) covers its true difference 95% of the time
    (within 4 binomial standard errors) and is at most the target wide."""
    rng, reps, n0, h, cap = np.random.default_rng(11), 2000, 3, 1.0, 400
    mu, sd = np.array([0.3, -0.2]), np.array([0.6, 1.4])  # two arms' true differences and noise
    t = sps.t.ppf(0.975, n0 - 1)
    ref = rng.normal(0.0, 0.5, (reps, cap))
    diffs = mu + sd * rng.normal(size=(reps, cap, 2)) - ref[..., None]  # arm - reference, per seed
    covered = np.zeros(2)
    for r in range(reps):
        n, plans = common_plan({"a": diffs[r, :n0, 0], "b": diffs[r, :n0, 1]}, n0, h, cap)
        for i, name in enumerate("ab"):
            assert abs(plans[name].half_width - t * plans[name].s0 / math.sqrt(n)) < 1e-12
            assert plans[name].half_width <= h + 1e-12 or plans[name].capped
            covered[i] += abs(diffs[r, :n, i].mean() - mu[i]) <= plans[name].half_width
    se = math.sqrt(0.95 * 0.05 / reps)
    assert covered / reps == pytest.approx([0.95, 0.95], abs=4 * se)


def _seeds(extra: dict[str, Any]) -> dict[str, Any]:
    return {"sampler": "grid", "n_trials": None, "space": {"scorer.name": {"type": "categorical",
            "choices": ["magnitude", "sensitivity"]}}, "seeds": {"half_width": 0.02,
            "reference": {"scorer.name": "magnitude"}, **extra}}


@pytest.mark.parametrize("extra,message", [
    ({"reference": {"scorer.name": "fisher"}}, "study.seeds.reference.scorer.name: 'fisher' is not one of"),
    ({"reference": {}}, "must give one value for each searched key (scorer.name); missing: scorer.name"),
    ({"pilot": 5, "max": 4}, "study.seeds.max (4) must be at least study.seeds.pilot (5)"),
    ({"half_width": 0}, "study.seeds.half_width: Input should be greater than 0"),
])
def test_bad_seed_options_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_study(_seeds(extra))
    assert message in str(err.value)


def test_seeds_need_a_grid_without_a_seed_key() -> None:
    with pytest.raises(ConfigError, match="set study.sampler: grid"):
        parse_study({**_seeds({}), "sampler": "tpe"})
    block = _seeds({})
    block["space"]["seed"] = {"type": "categorical", "choices": [0, 1]}
    with pytest.raises(ConfigError, match="drop seed from study.space"):
        parse_study(block)


@pytest.mark.parametrize("report,message", [
    ("report.half_width=0.01", "report.half_width (0.01) and study.seeds both plan the seeds"),
    ("report.reference={scorer.name: sensitivity}", "differs from study.seeds.reference"),
])
def test_a_report_block_with_another_plan_is_refused_before_any_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], report: str, message: str) -> None:
    seeds = "study.seeds={half_width: 0.02, reference: {scorer.name: magnitude}}"
    sets = [f"output_dir={tmp_path / 'out'}", ARMS, seeds, report]
    assert study_main([ABLATION, *(x for s in sets for x in ("--set", s))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _run(env: dict[str, Any], name: str, seeds: str, *flags: str, sets: Sequence[str] = ()) -> int:
    sets = [*env["sets"], ARMS, f"study.name={name}", f"study.seeds={seeds}", *sets]
    return study_main([ABLATION, *(x for s in sets for x in ("--set", s)), *flags])


def _by_arm(env: dict[str, Any], name: str) -> tuple[optuna.Study, dict[str, dict[int, float]]]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{env['out'] / 'optuna.db'}")
    arms: dict[str, dict[int, float]] = {}
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.params["seed"] not in arms.get(t.params["scorer.name"], {}), "a seed ran twice"
        arms.setdefault(t.params["scorer.name"], {})[t.params["seed"]] = float(t.value)  # type: ignore[arg-type]
    return study, arms


def _pilot_n(arms: dict[str, dict[int, float]], n0: int, h: float, cap: int) -> tuple[float, int, bool]:
    """The pilot's sd and Stein's n, computed here from the trials' values (not by the code under test)."""
    d = [arms["sensitivity"][s] - arms["magnitude"][s] for s in range(n0)]
    s0 = statistics.stdev(d)
    wanted = max(n0, math.ceil((sps.t.ppf(0.975, n0 - 1) * s0 / h) ** 2))
    return s0, min(wanted, cap), wanted > cap


def test_the_pilot_plans_the_seeds_and_the_cap_binds(env: dict[str, Any]) -> None:
    """Pilot 2, cap 4, a target far below the pilot's spread: the study runs seeds 0, 1 of both arms,
    plans 4 (the cap) and runs seeds 2, 3; run again, it adds nothing."""
    seeds = "{pilot: 2, max: 4, half_width: 0.001, reference: {scorer.name: magnitude}}"
    assert _run(env, "capped", seeds) == 0
    study, arms = _by_arm(env, "capped")
    s0, n, capped = _pilot_n(arms, 2, 0.001, 4)
    assert s0 > 0 and (n, capped) == (4, True)
    assert {k: sorted(v) for k, v in arms.items()} == {"magnitude": [0, 1, 2, 3], "sensitivity": [0, 1, 2, 3]}
    plan = study.user_attrs[PLAN_ATTR]
    assert (plan["n"], plan["capped"]) == (4, True)
    assert plan["comparisons"]["scorer.name=sensitivity"]["pilot_sd"] == pytest.approx(s0)
    trials = len(study.trials)
    assert _run(env, "capped", seeds) == 0  # resumed: the plan is kept, no seed runs twice
    assert len(_by_arm(env, "capped")[0].trials) == trials == 8
    with (env["out"] / "report" / "capped" / "comparisons.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert (row["planned_seeds"], row["n"], row["capped"], row["plan"]) == ("4", "4", "True", "final")
    # Stein's interval: the mean over the 4 seeds +- t(0.975, 1) s0 / sqrt(4), s0 the pilot's sd
    mean = statistics.fmean(arms["sensitivity"][s] - arms["magnitude"][s] for s in range(4))
    half = sps.t.ppf(0.975, 1) * s0 / 2
    assert (float(row["stein_low"]), float(row["stein_high"])) == pytest.approx((mean - half, mean + half))
    assert float(row["pilot_sd"]) == pytest.approx(s0) and row["pilot_pairs"] == "2"
    md = (env["out"] / "report" / "capped" / "report.md").read_text()
    assert "seed plan (study.seeds: pilot 2, target half-width 0.001, cap 4)" in md and "**N = 4**" in md
    assert "**The cap bound** for sensitivity" in md


def test_the_planned_n_between_pilot_and_cap(env: dict[str, Any]) -> None:
    """The same pilot (training is deterministic given the seed) with a target that asks for 3 seeds:
    h = t(0.975, 1) s0 / sqrt(2.5), so (t s0 / h)^2 = 2.5 -> 3, below the cap of 4.  Stopped by
    ``study.n_trials: 3`` inside the pilot; the next start, on two worker processes sharing the storage
    (each reads the stored plan), finishes the pilot, plans, and runs only what is missing."""
    _, arms = _by_arm(env, "capped")
    s0, _, _ = _pilot_n(arms, 2, 0.001, 4)
    h = float(sps.t.ppf(0.975, 1) * s0 / math.sqrt(2.5))
    seeds = f"{{pilot: 2, max: 4, half_width: {h!r}, reference: {{scorer.name: magnitude}}}}"
    assert _run(env, "planned", seeds, sets=["study.n_trials=3"]) == 0
    study, _ = _by_arm(env, "planned")
    assert len(study.trials) == 3 and PLAN_ATTR not in study.user_attrs  # 3 of the 4 pilot points: no plan yet
    assert _run(env, "planned", seeds, "--workers", "2", sets=["study.n_trials=3"]) == 0
    study, arms2 = _by_arm(env, "planned")
    assert {s: arms2["sensitivity"][s] - arms2["magnitude"][s] for s in (0, 1)} == pytest.approx(
        {s: arms["sensitivity"][s] - arms["magnitude"][s] for s in (0, 1)})
    assert {k: sorted(v) for k, v in arms2.items()} == {"magnitude": [0, 1, 2], "sensitivity": [0, 1, 2]}
    assert (study.user_attrs[PLAN_ATTR]["n"], study.user_attrs[PLAN_ATTR]["capped"]) == (3, False)
