"""Quality against budget (issue 23): multi-objective studies (Optuna trials, MLflow runs, the Pareto
front in the report) and budget curves with seed bands, end to end on the tiny BERT with real SQLite
stores; the Pareto front checked by hand and against Optuna's own ``best_trials``."""

from __future__ import annotations

import csv
import math
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from scipy import stats as sps
from tiny import make_tiny_model_dir, one_thread, tiny_overrides

from dora_lab.plan.objectives import pareto_front
from dora_lab.plan.setup import prepare
from dora_lab.report import compare as report
from dora_lab.run.config_yaml import ConfigError
from dora_lab.studies import main as study_main

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
OBJECTIVES = [{"metric": "matthews_correlation", "direction": "maximize"},
              {"metric": "adapter_parameters", "direction": "minimize"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with one_thread():
        root = tmp_path_factory.mktemp("budget")
        out = root / "out"
        # initialised wide (std 0.5), so that runs differ in their metric, not only in their size
        model = make_tiny_model_dir(root / "tiny", init_range=0.5)
        sets = [*tiny_overrides(model, out, train=64, evals=64), "train.eval_every=4", "train.lr=0.03",
                "adapter.alpha=64", "train.warmup_ratio=0"]
        yield {"root": root, "out": out, "sets": sets}


def _args(config: Path, sets: list[str], *extra: str) -> list[str]:
    return [str(config), *(x for s in [*sets, *extra] for x in ("--set", s))]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _study(env: dict[str, Any], name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{env['out'] / 'optuna.db'}")


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


# -- the Pareto front --------------------------------------------------------------------------------
def test_pareto_front_by_hand() -> None:
    # (metric up, parameters down): B dominates C (better and smaller), A dominates D (equal metric,
    # smaller); E is the best metric at the largest size; F equals A (neither dominates the other)
    points = [(0.5, 100), (0.4, 50), (0.3, 60), (0.5, 120), (0.6, 200), (0.5, 100)]
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 1, 4, 5]
    assert pareto_front(points, ["minimize", "minimize"]) == [1, 2]  # the metric down: C lowest, B smallest
    assert pareto_front([], ["maximize", "minimize"]) == []


def test_pareto_front_agrees_with_optunas_best_trials() -> None:
    """Optuna's own front (``study.best_trials``) over random points with ties, in three objectives too."""
    rng = random.Random(0)
    for directions in (["maximize", "minimize"], ["minimize", "minimize", "maximize"]):
        study = optuna.create_study(directions=directions)
        points = [[float(rng.randint(0, 6)) for _ in directions] for _ in range(60)]
        for p in points:
            study.add_trial(optuna.trial.create_trial(values=p, params={}, distributions={}))
        assert pareto_front(points, directions) == sorted(t.number for t in study.best_trials)


# -- the study block ------------------------------------------------------------------------------
def _block(tmp_path: Path, **study: Any) -> Path:
    path = tmp_path / "mo.yaml"
    block = {"name": "mo", "objectives": OBJECTIVES, "pruner": "none", "n_trials": 2,
             "space": {"budget.target_rank": {"type": "categorical", "choices": [1.0, 2.0]}}, **study}
    path.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "cola.yaml"), "output_dir": str(tmp_path / "o"),
                                    "study": block}))
    return path


@pytest.mark.parametrize(("study", "message"), [
    ({"pruner": "median"}, "pruner 'median' cannot prune a multi-objective study"),
    ({"objectives": OBJECTIVES[::-1]}, "the first objective must be a metric the evaluation measures"),
    ({"metric": "accuracy"}, "set either study.metric ('accuracy') or study.objectives, not both"),
    ({"objectives": OBJECTIVES[:1]}, "objectives needs two or more entries"),
    ({"objectives": [OBJECTIVES[0], OBJECTIVES[0]]}, "names a metric twice"),
    ({"objectives": [OBJECTIVES[0], {"metric": "adapter_parameters", "direction": "down"}]},
     "study.objectives.1.direction"),
])
def test_bad_objectives_are_refused_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           study: dict[str, Any], message: str) -> None:
    path = _block(tmp_path, **study)
    with pytest.raises(ConfigError, match="invalid study block"):
        prepare(path)
    assert study_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err, err
    assert not (tmp_path / "o").exists()  # nothing stored


def test_an_objective_the_wrong_way_round_is_refused(tmp_path: Path) -> None:
    wrong = [{"metric": "matthews_correlation", "direction": "minimize"}, OBJECTIVES[1]]
    with pytest.raises(ConfigError, match="study.objectives.0.direction is 'minimize' but the study's metric "
                                          "'matthews_correlation' is better when higher; set study.objectives.0"
                                          ".direction: maximize"):
        prepare(_block(tmp_path, objectives=wrong))
    setup = prepare(_block(tmp_path))  # and a right one resolves: the first objective is the study's metric
    assert setup.metric == "matthews_correlation" and setup.study.direction == "maximize"
    assert setup.goals == [("matthews_correlation", "maximize"), ("adapter_parameters", "minimize")]


def test_a_study_keeps_its_objectives(env: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A single-objective study opened again as a multi-objective one is refused, with the fix."""
    sets = [*env["sets"], f"output_dir={tmp_path / 'o'}"]
    path = _block(tmp_path, n_trials=1, objectives=[], pruner="none")
    assert study_main(_args(path, sets, "study.name=kept")) == 0
    assert study_main(_args(_block(tmp_path, n_trials=1), sets, "study.name=kept")) == 2
    assert "--set study.name=kept_v2" in capsys.readouterr().err
    (t,) = _complete(optuna.load_study(study_name="kept", storage=f"sqlite:///{tmp_path / 'o' / 'optuna.db'}"))
    assert len(t.values) == 1


# -- a multi-objective study end to end -----------------------------------------------------------
def test_multi_objective_study_end_to_end(env: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """TPE over the final budget (its multi-objective sampler from the third trial on): every trial
    has both values, the Pareto front is Optuna's best_trials on the terminal, on the MLflow parent
    run (tags, figure) and its child runs (tag dora_lab.pareto), and in the report (table, figure)."""
    config = tmp_path / "mo.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "cola.yaml"),
        "study": {"name": "mo_tpe", "objectives": OBJECTIVES, "pruner": "none", "n_trials": 5, "timeout": None,
                  "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2}, "overrides": {"adapter.r0": 3},
                  "space": {"budget.target_rank": {"type": "categorical", "choices": [0.5, 1.0, 2.0, 3.0]},
                            "seed": {"type": "categorical", "choices": [0, 1]}}},
        "report": {"factors": ["budget.target_rank"]}}))
    assert study_main(_args(config, env["sets"])) == 0
    printed = capsys.readouterr().out
    study = _study(env, "mo_tpe")
    done = _complete(study)
    assert len(done) == 5 and [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["matthews_correlation", "adapter_parameters"]
    front = sorted(t.number for t in study.best_trials)
    for t in done:  # the second value is the run's final adapter size, as metrics.json has it
        metrics = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert t.values[1] == metrics["adapter_parameters_final"] == t.user_attrs["adapter_parameters"]
        assert t.intermediate_values == {}  # nothing reported: no pruning in a multi-objective study
        assert t.user_attrs["active_components"] == t.params["budget.target_rank"] * 12  # 12 matrices
    assert f"Pareto front (maximize matthews_correlation, minimize adapter_parameters): {len(front)} of 5" in printed

    client = MlflowClient(f"sqlite:///{env['out'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mo_tpe")
    assert exp is not None
    found = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("dora_lab.role") == "study"]
    children = {int(r.data.tags["trial"]): r for r in found if r.data.tags.get("dora_lab.role") == "trial"}
    assert sorted(children) == [t.number for t in done]  # one MLflow run per Optuna trial
    assert parent.data.tags["pareto.trials"] == " ".join(map(str, front))
    assert parent.data.tags["optuna.direction"] == "maximize,minimize" and "best.trial" not in parent.data.tags
    for t in done:
        run = children[t.number]
        assert run.data.tags["dora_lab.pareto"] == ("true" if t.number in front else "false")
        assert run.data.metrics["objective"] == t.values[0]
        assert run.data.metrics["objective/adapter_parameters"] == t.values[1]
    view = next(v for k, v in exp.tags.items() if k.startswith("mlflow.sharedViewState."))
    assert "tags.`dora_lab.pareto`" in yaml.safe_load(view)["selectedColumns"]  # the runs table shows the front
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "summary/plots")}
    assert "summary/plots/pareto_front.png" in logged
    assert "report/pareto.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    # the report's front, computed by dora_lab from the runs, is Optuna's
    out = env["out"] / "report" / "mo_tpe"
    rows = read_csv(out / "pareto.csv")
    kept = {int(r["trial"]) for r in read_csv(out / "runs.csv")}  # a repeated point (TPE may draw one) counts once
    text = (out / "report.md").read_text()
    for number in sorted({t.number for t in done} - kept):
        assert f"trial {number} of `mo_tpe`: COMPLETE (repeats trial" in text
    assert sorted(int(r["trial"]) for r in rows) == [n for n in front if n in kept]
    assert rows and {r["optuna_front"] for r in rows} == {"yes"}
    assert "## Pareto front: quality against adapter parameters" in text and "![Pareto front](pareto.png)" in text
    assert (out / "pareto.png").stat().st_size > 1000


# -- budget curves: the shipped study files on the tiny model -----------------------------------------
def test_budget_curves_of_the_shipped_studies(env: dict[str, Any]) -> None:
    """studies/budget_curves.yaml (two budgets), its LoRA arm (two ranks, on two worker processes) and
    its AdaLoRA and increlora arms (one budget), two seeds each, run as documented: one curve per arm with mean, sd and t-interval per budget, the points matched with
    LoRA at the same size, and the pooled Pareto front."""
    lora_r1 = 2 * (4 * (32 + 32 + 1) + 2 * (32 + 64 + 1))  # the tiny BERT: 2 layers, 908 parameters per rank
    seeds = "study.space.seed={type: categorical, choices: [0, 1]}"
    assert study_main(_args(STUDIES / "budget_curves.yaml", [*env["sets"], "adapter.r0=2"], seeds,
                            "study.space.method.name={type: categorical, choices: [dora]}",
                            f"study.space.budget.target_params={{type: categorical, choices: [{lora_r1 // 2}, "
                            f"{2 * lora_r1}]}}")) == 0
    assert study_main([*_args(STUDIES / "budget_curves_lora.yaml", env["sets"], seeds,  # worker processes too
                              "study.space.adapter.r0={type: categorical, choices: [1, 2]}"), "--workers", "2"]) == 0
    for arm in ("adalora", "increlora"):
        assert study_main(_args(STUDIES / f"budget_curves_{arm}.yaml", [*env["sets"], "adapter.r0=2"], seeds,
                                f"study.space.budget.target_params={{type: categorical, choices: [{2 * lora_r1}]}}")) == 0
    out = env["root"] / "curves-report"
    assert report.main([*_args(STUDIES / "budget_curves.yaml", env["sets"]), "--out", str(out)]) == 0

    arms = {"budget_curves": ("method=dora, schedule=dora", "budget.target_params"),
            "budget_curves_lora": ("method=dora, schedule=constant", "adapter.r0"),
            "budget_curves_adalora": ("method=dora, schedule=adalora", "budget.target_params"),
            "budget_curves_increlora": ("method=increlora, schedule=dora", "budget.target_params")}
    done = {name: _complete(_study(env, name)) for name in arms}
    assert [len(v) for v in done.values()] == [4, 4, 2, 2]
    members: dict[tuple[str, str], list[optuna.trial.FrozenTrial]] = {}
    for name, (curve, key) in arms.items():
        for t in done[name]:
            members.setdefault((curve, str(t.params[key])), []).append(t)
    points = read_csv(out / "budget_curves.csv")
    assert len(points) == 6
    for p in points:
        budget = p["adapter.r0"] if p["curve"].endswith("constant") else p["budget.target_params"]
        ts = members[(p["curve"], budget)]
        xs = [t.values[0] for t in ts]
        mean, sd = statistics.mean(xs), statistics.stdev(xs)
        half = sps.t.ppf(0.975, 1) * sd / math.sqrt(2)
        assert int(p["n"]) == 2 and float(p["mean"]) == pytest.approx(mean) and float(p["sd"]) == pytest.approx(sd)
        assert float(p["ci_low"]) == pytest.approx(mean - half) and float(p["ci_high"]) == pytest.approx(mean + half)
        assert float(p["adapter_parameters"]) == pytest.approx(statistics.mean(t.values[1] for t in ts))
    lora = {r: statistics.mean(t.values[1] for t in members[("method=dora, schedule=constant", str(r))]) for r in (1, 2)}
    assert lora == {1: lora_r1, 2: 2 * lora_r1}  # LoRA's size is its rank's, exactly

    # matched budgets: DoRA at 2 x r1 from r0 = 2 prunes nothing, so it is LoRA r2's size exactly
    matched = {r["group"]: r for r in read_csv(out / "budget_matched.csv")}
    assert any(g.startswith("method=dora, schedule=adalora") for g in matched)  # 2 x r1 from r0 = 2: no pruning
    key = next(g for g in matched if f"schedule=dora, target_params={2 * lora_r1}" in g)
    row = matched[key]
    assert row["reference"].endswith("r0=2") and float(row["reference_adapter_parameters"]) == 2 * lora_r1
    by_seed = {(s, t.params["seed"]): t.values[0] for s, ts in (("dora", members[("method=dora, schedule=dora",
                                                                                   str(2 * lora_r1))]),
                                                                ("lora", members[("method=dora, schedule=constant",
                                                                                  "2")])) for t in ts}
    diffs = [by_seed[("dora", s)] - by_seed[("lora", s)] for s in (0, 1)]
    assert int(row["n"]) == 2 and float(row["mean_diff"]) == pytest.approx(statistics.mean(diffs), abs=1e-12)
    half_budget = [g for g in matched if f"target_params={lora_r1 // 2}" in g]
    assert not half_budget  # 0.5 x r1: no LoRA of that size, no match

    # the pooled Pareto front over all 12 runs, by brute force over their (metric, size)
    runs = [t for ts in done.values() for t in ts]
    best = {(t.values[0], t.values[1]) for t in runs
            if not any(u.values[0] >= t.values[0] and u.values[1] <= t.values[1] and
                       (u.values[0], u.values[1]) != (t.values[0], t.values[1]) for u in runs)}
    rows = read_csv(out / "pareto.csv")
    assert {(float(r["value"]), float(r["adapter_parameters_final"])) for r in rows} == best
    text = (out / "report.md").read_text()
    assert "## Quality against budget" in text and "![budget curves](budget_curves.png)" in text
    assert (out / "budget_curves.png").stat().st_size > 1000
