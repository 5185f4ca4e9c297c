"""The report's power columns, seed plan, convergence / majority warnings and results over tasks, on
small synthetic studies: real SQLite Optuna studies whose trials point at run folders written here
(no training), then ``python -m dora_lab.report``; every number checked against a computation here."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from scipy import stats as sps

from dora_lab.report import compare as report
from dora_lab.report.power import min_detectable_difference, seeds_needed
from dora_lab.track.seed_plan import stein_n

SEEDS = range(5)
# per task: the reference's values by seed, and the other arm's paired differences by seed
BASE = {"cola": [0.30, 0.32, 0.28, 0.31, 0.29], "sst2": [444 / 872] * 5}
DIFF = {"cola": [0.020, 0.035, 0.010, 0.028, 0.015], "sst2": [0.10, 0.06, 0.12, 0.08, 0.09]}
METRIC = {"cola": "matthews_correlation", "sst2": "accuracy"}
SHARE = {"cola": 721 / 1043, "sst2": 444 / 872}


def _run(folder: Path, task: str, scorer: str, seed: int, value: float, rising: bool) -> None:
    folder.mkdir(parents=True)
    config = {"seed": seed, "task": {"name": task}, "scorer": {"name": scorer}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    offsets = [-0.2, -0.15, -0.1, -0.06, -0.03, 0.0] if rising else [-0.1, -0.02, 0.0, 0.001, 0.0, 0.0]
    curve = [value + o for o in offsets]
    # a CoLA run evaluates accuracy as well (a little above its majority share), as the real runs do
    also = {"accuracy": 0.70} if task == "cola" else {}
    history = [{METRIC[task]: v, **also, "step": 100.0 * (i + 1)} for i, v in enumerate(curve)]
    (folder / "metrics.json").write_text(json.dumps({"metric": METRIC[task], "final": history[-1],
                                                     "history": history, "checks": {"majority_share": SHARE[task]}}))


def _study(root: Path, task: str, storage: str) -> None:
    study = optuna.create_study(study_name=f"s_{task}", storage=storage, direction="maximize")
    dist = {"scorer.name": optuna.distributions.CategoricalDistribution(["magnitude", "sensitivity"]),
            "seed": optuna.distributions.CategoricalDistribution(list(SEEDS))}
    for scorer in ("magnitude", "sensitivity"):
        for s in SEEDS:
            value = BASE[task][s] + (DIFF[task][s] if scorer == "sensitivity" else 0.0)
            folder = root / task / f"{scorer}-{s}"
            _run(folder, task, scorer, s, value, rising=(task, scorer, s) == ("cola", "sensitivity", 2))
            study.add_trial(optuna.trial.create_trial(params={"scorer.name": scorer, "seed": s}, distributions=dist,
                                                      value=value, user_attrs={"run_dir": str(folder)}))


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("synthetic")
    url = f"sqlite:///{root / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for task in ("cola", "sst2"):
        _study(root, task, url)
    return url


def _report(storage: str, out: Path, *extra: str) -> int:
    return report.main(["s_cola", "s_sst2", "--storage", storage, "--no-mlflow", "--out", str(out), *extra])


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_two_tasks_power_ranks_pooled_test_and_flags(storage: str, tmp_path: Path) -> None:
    assert _report(storage, tmp_path, "--min-effect", "0.01") == 0  # the reference: magnitude, per task
    rows = {r["group"]: r for r in _csv(tmp_path / "comparisons.csv")}
    assert set(rows) == {"scorer=sensitivity, task=cola", "scorer=sensitivity, task=sst2"}
    for task in ("cola", "sst2"):
        row, sd = rows[f"scorer=sensitivity, task={task}"], statistics.stdev(DIFF[task])
        assert row["reference"] == f"scorer=magnitude, task={task}" and row["n"] == "5"
        assert float(row["mdd"]) == pytest.approx(min_detectable_difference(sd, 5))
        assert float(row["seeds_for_min_effect"]) == seeds_needed(0.01, sd)
    # the MDD at 5 pairs is 1.68 sd (exact noncentral t), not the normal formula's 1.25 sd
    assert float(rows["scorer=sensitivity, task=cola"]["mdd"]) == pytest.approx(
        1.68200 * statistics.stdev(DIFF["cola"]), rel=1e-4)

    # pooled over tasks x seeds: the mean of the two tasks' mean differences, Welch-Satterthwaite df
    (pooled,) = _csv(tmp_path / "pooled.csv")
    v = [statistics.variance(DIFF[t]) / 5 for t in ("cola", "sst2")]
    d = (statistics.mean(DIFF["cola"]) + statistics.mean(DIFF["sst2"])) / 2
    se, df = math.sqrt(sum(v)) / 2, sum(v) ** 2 / sum(x ** 2 / 4 for x in v)
    assert (pooled["group"], pooled["reference"], pooled["pairs"]) == ("sensitivity", "magnitude", "10")
    assert float(pooled["mean_diff"]) == pytest.approx(d) and float(pooled["df"]) == pytest.approx(df)
    assert float(pooled["p_t"]) == pytest.approx(2 * sps.t.sf(d / se, df))

    ranks = {r["arm"]: r for r in _csv(tmp_path / "ranks.csv")}  # sensitivity is better on both tasks
    assert float(ranks["sensitivity"]["mean rank"]) == 1.0 and float(ranks["magnitude"]["mean rank"]) == 2

    flags = {(r["group"], r["seed"]): r for r in _csv(tmp_path / "flags.csv")}
    assert flags[("scorer=sensitivity, task=cola", "2")]["still_rising"] == "True"
    assert sum(r["still_rising"] == "True" for r in flags.values()) == 1
    assert all(r["at_majority"] == "True" for (g, _), r in flags.items() if g == "scorer=magnitude, task=sst2")
    md = (tmp_path / "report.md").read_text()
    for text in ("## Convergence and learning", "scorer=sensitivity, task=cola, seed 2: still rising",
                 "scorer=magnitude, task=sst2: has not learned", "## Across tasks", "Welch-Satterthwaite",
                 "MDD (power 0.8)", "seeds for 0.01", "noncentral t"):
        assert text in md, text
    assert "scorer=magnitude, task=cola: has not learned" not in md
    # each task's last evaluation in its own metric (MCC on CoLA, accuracy on SST-2)
    last = {g["group"]: float(g["final_mean"]) for g in _csv(tmp_path / "groups.csv")}
    assert last["scorer=magnitude, task=sst2"] == pytest.approx(444 / 872)
    assert last["scorer=magnitude, task=cola"] == pytest.approx(statistics.mean(BASE["cola"]))


@pytest.mark.parametrize("cola_by", ["command line", "named include"])
def test_each_task_is_read_in_its_own_metric_whatever_comes_first(storage: str, tmp_path: Path, cola_by: str) -> None:
    """SST-2 first: the report's metric is accuracy, which the CoLA runs evaluate too; their values
    (MCC 0.28-0.33) must still be read as MCC, not as accuracies below CoLA's majority share.  The CoLA
    study comes either as a config on the command line or as a bare study name in SST-2's
    ``report.include`` (no config to say its metric: each run's metrics.json says it)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    for task in ("cola", "sst2"):  # study files: each source's metric is its own task's main metric
        (tmp_path / f"{task}.yaml").write_text(yaml.safe_dump({"base": str(root / f"{task}.yaml"), "study": {
            "name": f"s_{task}", "storage": storage}}))
    out = tmp_path / "out"
    if cola_by == "command line":
        args = [str(tmp_path / "sst2.yaml"), str(tmp_path / "cola.yaml")]
    else:
        config = yaml.safe_load((tmp_path / "sst2.yaml").read_text())
        (tmp_path / "sst2.yaml").write_text(yaml.safe_dump({**config, "report": {"include": ["s_cola"]}}))
        args = [str(tmp_path / "sst2.yaml")]
    assert report.main([*args, "--no-mlflow", "--out", str(out)]) == 0
    flags = {(r["group"], r["seed"]): r for r in _csv(out / "flags.csv")}
    assert {r["at_majority"] for (g, _), r in flags.items() if "cola" in g} == {"False"}
    assert flags[("scorer=sensitivity, task=cola", "2")]["still_rising"] == "True"
    md = (out / "report.md").read_text()
    assert "task=cola: has not learned" not in md and "scorer=magnitude, task=sst2: has not learned" in md
    last = {g["group"]: float(g["final_mean"]) for g in _csv(out / "groups.csv")}
    assert last["scorer=magnitude, task=cola"] == pytest.approx(statistics.mean(BASE["cola"]))


def test_seed_plan_from_a_pilot(storage: str, tmp_path: Path) -> None:
    """Stein's rule: the pilot (seeds 0, 1, 2) fixes n; the analysis uses exactly the n smallest seeds."""
    s0 = statistics.stdev(DIFF["cola"][:3])
    t = sps.t.ppf(0.975, 2)
    h = t * s0 / math.sqrt(3.5)  # (t s0 / h)^2 = 3.5: n = 4 of the 5 seeds there
    assert _report(storage, tmp_path / "final", "--half-width", str(h), "--pilot-seeds", "3") == 0
    row = next(r for r in _csv(tmp_path / "final" / "comparisons.csv") if "cola" in r["group"])
    assert stein_n(s0, 3, h).n == 4 and row["planned_seeds"] == "4" and row["plan"] == "final"
    assert row["seeds"] == "0 1 2 3" and row["n"] == "4"
    mean = statistics.mean(DIFF["cola"][:4])
    assert float(row["stein_low"]) == pytest.approx(mean - t * s0 / 2)  # half-width t s0 / sqrt(4)
    # a narrower target needs more seeds than ran: interim, all 5 analysed, no Stein interval
    assert _report(storage, tmp_path / "interim", "--half-width", str(h / 2)) == 0
    row = next(r for r in _csv(tmp_path / "interim" / "comparisons.csv") if "cola" in r["group"])
    assert row["plan"] == "interim: 9 more seed(s) to run" and row["planned_seeds"] == "14" and row["n"] == "5"
    assert row["seeds_to_run"] == "5 6 7 8 9 10 11 12 13" and row["stein_low"] == "nan"
    md = (tmp_path / "interim" / "report.md").read_text()
    assert "Stein's two-stage rule" in md
    todo = sorted({int(x) for r in _csv(tmp_path / "interim" / "comparisons.csv") for x in r["seeds_to_run"].split()})
    assert todo == list(range(5, 20))  # SST-2's plan asks for the cap, 20 seeds: every comparison's seeds
    assert ("`python -m dora_lab.study CONFIG --set study.name=s_cola_more --set 'study.space.seed={type: "
            f"categorical, choices: [{', '.join(map(str, todo))}]}}'`") in md


@pytest.mark.parametrize("flags,message", [
    (["--half-width", "-1"], "report.half_width: Input should be greater than 0; got -1.0"),
    (["--half-width", "0.01", "--pilot-seeds", "4", "--max-seeds", "3"], "report.max_seeds (3) must be at least"),
    (["--min-effect", "0"], "report.min_effect: Input should be greater than 0"),
])
def test_bad_power_options_are_refused_before_any_file(storage: str, tmp_path: Path, flags: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _report(storage, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_report_block_keys_are_checked(tmp_path: Path) -> None:
    from dora_lab.plan.report_block import parse_report
    from dora_lab.run.config_yaml import ConfigError

    assert parse_report({"min_effect": 0.02, "power": 0.9}, "x.yaml").power == 0.9
    with pytest.raises(ConfigError, match=r"x.yaml: report.power: Input should be less than 1; got 1.5"):
        parse_report({"power": 1.5}, "x.yaml")
    with pytest.raises(ConfigError, match="unknown key; allowed: reference, factors, include, archives, min_effect"):
        parse_report({"min_efect": 0.02}, "x.yaml")




def test_the_sst2_scorer_study_is_a_two_task_report(tmp_path: Path) -> None:
    """studies/ablation_scorer_sst2.yaml: 3 scorers x 5 seeds of configs/sst2.yaml's full run, its report
    pooling its LoRA arm (8 seeds), CoLA's two other scorers and CoLA's methods ablation with its LoRA arm
    (8 seeds) and sora's 8 seeds, with min_effect 0.02; every pooled study file exists."""
    from dora_lab.plan.setup import prepare, trial_config
    from dora_lab.report.io import read_report_block, source_from_config

    path = Path(__file__).resolve().parents[1] / "studies" / "ablation_scorer_sst2.yaml"
    setup = prepare(path, [f"output_dir={tmp_path}"])
    grid = setup.study.grid()
    configs = [trial_config(setup.data, setup.study, {"scorer.name": s, "seed": n}) for s in grid["scorer.name"]
               for n in grid["seed"]]
    assert len(configs) == 15 and {c.seed for c in configs} == set(range(5))
    assert {(c.task.name, c.task.max_train_samples, c.task.max_eval_samples, c.train.epochs) for c in configs} == {
        ("sst2", 8551, None, 3.0)}
    block = read_report_block(path)
    assert block["include"] == ["ablation_scorer_sst2_lora.yaml", "ablation_scorer_sst2_lora_more.yaml",
                                "ablation_scorer_cola.yaml", "ablation_methods_v2.yaml",
                                "ablation_methods_v2_lora.yaml", "ablation_methods_v2_lora_more.yaml",
                                "ablation_methods_v2_sora_more.yaml"] and block["min_effect"] == 0.02
    assert all((path.parent / name).is_file() for name in block["include"])
    assert block["factors"][0] == "task.name" and block["reference"]["schedule.name"] == "constant"
    assert source_from_config(path, [f"output_dir={tmp_path}"]).metric == "accuracy"


def test_a_study_refuses_a_bad_report_block_before_any_trial(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The report runs after the last trial; its block's mistakes must stop the study at the start."""
    from dora_lab.studies import main as study_main

    path = Path(__file__).resolve().parents[1] / "studies" / "ablation_scorer_sst2.yaml"
    code = study_main([str(path), "--set", f"output_dir={tmp_path}", "--set", "report.half_width=0.01",
                       "--set", "report.pilot_seeds=5", "--set", "report.max_seeds=4"])
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "report.max_seeds (4) must be at least report.pilot_seeds (5)" in err
    assert not (tmp_path / "optuna.db").exists()
