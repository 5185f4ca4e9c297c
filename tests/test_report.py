"""Reports built from real tiny studies: the shipped ablation files run by the real study runner on a
tiny BERT and a slice of CoLA (SQLite Optuna and MLflow stores), then ``python -m dora_lab.report``;
every number in the tables is checked against the trials and run folders computed here.

The shipped study files, report blocks included, run through the study runner as documented.
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import math
import os
import re
import statistics
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow_server import get, post
from mlflow_server import mlflow_server as serve_mlflow
from scipy import stats as sps
from tiny import minilm_dir, one_thread, tiny_overrides
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from dora_lab.plan.setup import parse_study, read_study_block, trial_config
from dora_lab.report import compare as report
from dora_lab.report.brief import included_runs
from dora_lab.report.io import read_report_block, source_from_config
from dora_lab.run.config_yaml import ConfigError, read_yaml
from dora_lab.studies import main as study_main

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"


def _tiny_model(path: Path) -> Path:
    """The tests' tiny BERT, initialised wide (std 0.5) so that its predictions differ from run to run
    (at the default 0.02 it predicts one class and every run scores the same)."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with one_thread():
        root = tmp_path_factory.mktemp("report")
        out = root / "out"
        sets = [*tiny_overrides(_tiny_model(root / "tiny"), out, train=64, evals=64), "train.eval_every=4",
                "train.lr=0.03", "adapter.alpha=64", "train.warmup_ratio=0"]
        yield {"root": root, "out": out, "sets": sets}


def run_study(env: dict[str, Any], name: str, *extra: str) -> None:
    """Run the shipped ``studies/<name>.yaml`` with the tiny overrides, as the README's command does."""
    assert study_main([str(STUDIES / f"{name}.yaml"), *(x for s in [*env["sets"], *extra] for x in ("--set", s))]) == 0


def report_args(env: dict[str, Any], name: str, out: Path, *extra: str) -> list[str]:
    return [str(STUDIES / f"{name}.yaml"), *(x for s in env["sets"] for x in ("--set", s)), "--out", str(out),
            *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def trials(env: dict[str, Any], name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{env['out'] / 'optuna.db'}")
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def top(scores: list[float], k: int) -> set[int]:
    """The positions of the k highest scores (Python's sort is stable: ties go to the earlier position)."""
    return set(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


def test_scorer_ablation_report(env: dict[str, Any]) -> None:
    two = "study.space.scorer.name={type: categorical, choices: [magnitude, sensitivity]}"
    run_study(env, "ablation_scorer", two)
    done = trials(env, "ablation_scorer")
    assert len(done) == 6
    out = env["root"] / "scorer-report"
    assert report.main(report_args(env, "ablation_scorer", out)) == 0
    value = {(t.params["scorer.name"], t.params["seed"]): float(t.value or 0) for t in done}
    assert len(set(value.values())) > 2  # the tiny runs do differ

    groups = {g["group"]: g for g in read_csv(out / "groups.csv")}
    assert list(groups) == ["magnitude", "sensitivity"]  # the reference (report.reference) first
    for scorer, g in groups.items():
        xs = [value[(scorer, s)] for s in (0, 1, 2)]
        mean, sd = statistics.mean(xs), statistics.stdev(xs)
        half = sps.t.ppf(0.975, 2) * sd / math.sqrt(3)
        assert int(g["n"]) == 3 and float(g["mean"]) == pytest.approx(mean) and float(g["sd"]) == pytest.approx(sd)
        assert float(g["ci_low"]) == pytest.approx(mean - half) and float(g["ci_high"]) == pytest.approx(mean + half)
        assert float(g["min"]) == min(xs) and float(g["max"]) == max(xs)
        assert float(g["active_components"]) == 2 * 12  # target rank 2 x 12 matrices
        assert float(g["trainable_parameters"]) > float(g["adapter_parameters_final"]) > 0

    (cmp,) = read_csv(out / "comparisons.csv")
    diffs = [value[("sensitivity", s)] - value[("magnitude", s)] for s in (0, 1, 2)]
    assert (cmp["group"], cmp["reference"], cmp["n"]) == ("sensitivity", "magnitude", "3")
    assert float(cmp["mean_diff"]) == pytest.approx(statistics.mean(diffs), abs=1e-12)
    if statistics.stdev(diffs) > 1e-9:
        p = sps.ttest_rel([value[("sensitivity", s)] for s in (0, 1, 2)],
                          [value[("magnitude", s)] for s in (0, 1, 2)])
        assert float(cmp["p_t"]) == pytest.approx(float(p.pvalue))
        assert float(cmp["p_holm"]) == pytest.approx(float(p.pvalue))  # one comparison: Holm changes nothing
    assert float(cmp["p_sign_flip"]) >= 0.25  # 3 pairs

    # agreement: Kendall tau over the 36 components of each pair of same-seed runs, and top-24 overlap
    rows = [r for r in read_csv(out / "agreement.csv") if r["kind"] == "scorer vs scorer"]
    assert sorted(int(r["seed_a"]) for r in rows) == [0, 1, 2]
    folder = {(t.params["scorer.name"], t.params["seed"]): Path(t.user_attrs["run_dir"]) for t in done}
    for r in rows:
        seed = int(r["seed_a"])
        a = yaml.safe_load((folder[("magnitude", seed)] / "scores.json").read_text())["scores"]
        b = yaml.safe_load((folder[("sensitivity", seed)] / "scores.json").read_text())["scores"]
        x = [v for layer in a for v in a[layer]]
        y = [v for layer in a for v in b[layer]]
        assert len(x) == int(r["components"]) == 36 and int(r["k"]) == 24
        assert float(r["kendall_tau"]) == pytest.approx(float(sps.kendalltau(x, y).statistic))
        assert float(r["top_k_overlap"]) == pytest.approx(len(top(x, 24) & top(y, 24)) / 24)
    assert {r["kind"] for r in read_csv(out / "agreement.csv")} == {"scorer vs scorer", "seed vs seed"}

    md = (out / "report.md").read_text()
    for text in ("## Results per group", "## Paired comparisons against the reference", "Holm",
                 "ttest_rel", "sign-flip", "## Agreement between scorers", "Kendall",
                 "![rank allocation](allocation.png)",
                 "95% CI", "`scorer.name` = magnitude", "**matthews_correlation**"):
        assert text in md, text
    for picture in ("metric_by_group.png", "allocation.png", "budget.png"):
        data = (out / picture).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, picture
    # the same files on the study's MLflow parent run
    client = MlflowClient(f"sqlite:///{env['out'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ablation_scorer")
    assert exp is not None
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dora_lab.role") == "study"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/groups.csv", "report/comparisons.csv", "report/metric_by_group.png",
            "report/allocation.png", "report/budget.png"} <= logged
    assert client.get_run(parent.info.run_id).data.tags["dora_lab.report"] == "report/report.md"
    # the convergence flags: in every run's metrics.json, as tags of its MLflow run, per run in flags.csv
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dora_lab.role") != "study"]
    assert len(children) == 6
    for child in children:
        checks = yaml.safe_load((Path(child.data.tags["dora_lab.run_dir"]) / "metrics.json").read_text())["checks"]
        # (one evaluation a run here, the study's eval_every 100 > 12 steps: still_rising is not judged, null)
        assert child.data.tags["dora_lab.still_rising"] == json.dumps(checks["still_rising"])
        assert child.data.tags["dora_lab.at_majority"] == json.dumps(checks["at_majority"])
        # what the run ran on (dora_lab.run.environment): in metrics.json and as tags
        env_of_run = yaml.safe_load((Path(child.data.tags["dora_lab.run_dir"]) / "metrics.json").read_text())
        assert env_of_run["environment"]["torch"] == torch.__version__
        assert child.data.tags["dora_lab.env.torch"] == torch.__version__
        assert child.data.tags["dora_lab.env.device"] == env_of_run["environment"]["device"]
    assert "more than one environment" not in md  # one machine, one environment: no warning
    assert {r["torch"] for r in read_csv(out / "runs.csv")} == {torch.__version__}  # per run in runs.csv
    assert len(read_csv(out / "flags.csv")) == 6 and "## Convergence and learning" in md

    # by study name and storage: the same groups
    again = env["root"] / "by-name"
    assert report.main(["ablation_scorer", "--storage", f"sqlite:///{env['out'] / 'optuna.db'}", "--no-mlflow",
                        "--reference", "scorer.name=sensitivity", "--out", str(again)]) == 0
    by_name = {g["group"]: g for g in read_csv(again / "groups.csv")}
    assert list(by_name) == ["sensitivity", "magnitude"]
    assert all(by_name[k]["mean"] == groups[k]["mean"] for k in groups)
    (cmp2,) = read_csv(again / "comparisons.csv")
    assert float(cmp2["mean_diff"]) == pytest.approx(-float(cmp["mean_diff"]))


def test_budget_ablation_pools_both_arms(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    one_seed = "study.space.seed={type: categorical, choices: [0]}"
    run_study(env, "ablation_budget", one_seed)
    # its report includes the LoRA arm, not run yet: the study says so and still succeeds
    printed = capsys.readouterr()
    assert "no study 'ablation_budget_constant'" in printed.err and "note: no report (see above)" in printed.out
    # the live answer in MLflow did not fail on the reference (schedule=constant) that only the
    # included study has: it answered with the default reference until that study ran
    assert "answer in MLflow's description was not updated" not in printed.err
    run_study(env, "ablation_budget_constant", one_seed)
    # now the live answer pools the included arm, read as the report reads it (the same --set values)
    sets = [*env["sets"], one_seed]
    pooled = included_runs(source_from_config(STUDIES / "ablation_budget.yaml", sets), sets)
    assert sorted(r.config["adapter.r0"] for r in pooled) == [1, 2, 4]
    out = env["root"] / "budget-report"
    assert report.main(report_args(env, "ablation_budget", out, "--no-mlflow")) == 0
    groups = {g["group"]: g for g in read_csv(out / "groups.csv")}
    ranks = ("1", "2", "4")
    assert list(groups) == [f"schedule=constant, final_rank={k}" for k in ranks] + [
        f"schedule=dora, final_rank={k}" for k in ranks]
    # LoRA at rank k: k components in each of the 12 matrices, each 32 + 32 + 1 (attention: q k v out) or
    # 32 + 64 + 1 (the MLP's two) parameters: 2 layers x (4 x 65 + 2 x 97) = 908 per unit of rank
    for k in ranks:
        assert float(groups[f"schedule=constant, final_rank={k}"]["adapter_parameters_final"]) == 908 * int(k)
        assert float(groups[f"schedule=dora, final_rank={k}"]["active_components"]) == 12 * int(k)
    value = {(t.params.get("budget.target_rank"), t.params.get("adapter.r0")): float(t.value or 0)
             for name in ("ablation_budget", "ablation_budget_constant") for t in trials(env, name)}
    rows = read_csv(out / "comparisons.csv")
    assert [(r["group"], r["reference"]) for r in rows] == [
        (f"schedule=dora, final_rank={k}", f"schedule=constant, final_rank={k}") for k in ranks]
    for r, k in zip(rows, ranks, strict=True):  # one seed: the difference itself, no test
        assert float(r["mean_diff"]) == pytest.approx(value[(float(k), None)] - value[(None, int(k))])
        assert r["n"] == "1" and math.isnan(float(r["p_t"]))
    md = (out / "report.md").read_text()
    assert "`ablation_budget` (" in md and "`ablation_budget_constant` (" in md and "final_rank` is measured" in md


def test_the_study_makes_its_report_and_logs_it_as_one_html_file(env: dict[str, Any],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A study with a report: block makes its report at the end and logs it to the parent run, as
    Markdown and as one HTML file with its pictures embedded; checked through a real MLflow server."""
    with serve_mlflow(f"sqlite:///{env['root'] / 'served.db'}", env["root"] / "served-artifacts") as server:
        run_study(env, "ablation_schedule", "study.space.seed={type: categorical, choices: [0]}",
                  "study.space.schedule.name={type: categorical, choices: [dora, linear]}",
                  f"study.tracking_uri={server}")
        printed = capsys.readouterr().out
        api = f"{server}/api/2.0/mlflow"
        exp = get(f"{api}/experiments/get-by-name?experiment_name=ablation_schedule")["experiment"]
        (parent,) = post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                "filter": "tags.`dora_lab.role` = 'study'"})["runs"]
        run_id = parent["info"]["run_id"]
        listed = get(f"{api}/artifacts/list?" + urllib.parse.urlencode({"run_id": run_id, "path": "report"}))
        assert {"report/report.md", "report/report.html"} <= {f["path"] for f in listed["files"]}
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        assert tags["dora_lab.report_html"] == "report/report.html"

        def served(path: str) -> bytes:
            query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
            with urllib.request.urlopen(f"{server}/get-artifact?{query}", timeout=30) as r:
                return bytes(r.read())

        page = served("report/report.html").decode()
    out = env["out"] / "report" / "ablation_schedule"  # the report's default folder
    assert f"report: {out / 'report.md'}" in printed and f"{out / 'report.html'} (one file" in printed
    link = f"{server}/#/experiments/{exp['experiment_id']}/runs/{run_id}/artifactPath/report/report.html?workflowType=machine_learning"
    assert f"logged to the MLflow parent run of 'ablation_schedule': {link}" in printed
    assert served_md_equal(out, page)
    images = re.findall(r"<img [^>]*>", page)
    assert len(images) == 3  # metric_by_group, allocation, budget: each embedded, none linked
    embedded = [base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', i).group(1)) for i in images]  # type: ignore[union-attr]
    assert embedded == [(out / f).read_bytes() for f in ("metric_by_group.png", "allocation.png", "budget.png")]
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # nothing loaded from elsewhere


def served_md_equal(out: Path, page: str) -> bool:
    """The HTML is the Markdown's: its headings and a table row of it, as text."""
    md = (out / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", md, re.MULTILINE)
    return bool(headings) and all(f"<h2>{html.escape(h, quote=False)}</h2>" in page for h in headings)


def test_study_files_are_the_documented_designs(tmp_path: Path) -> None:
    """Each shipped ablation: its grid, that every grid point is a valid run config, its report block."""
    expected = {"ablation_scorer": 9, "ablation_schedule": 9, "ablation_budget": 9, "ablation_budget_constant": 9}
    for name, size in expected.items():
        path = STUDIES / f"{name}.yaml"
        source = source_from_config(path, [f"output_dir={tmp_path}"])
        assert source.name == name and source.storage == f"sqlite:///{tmp_path / 'optuna.db'}"
        data = read_yaml(path)
        data.pop("report", None)
        block = read_study_block(path)
        study = parse_study(block)
        grid = study.grid()
        assert study.sampler.name == "grid" and grid["seed"] == [0, 1, 2]
        points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
        assert len(points) == size
        configs = [trial_config(data, study, p) for p in points]
        assert {c.seed for c in configs} == {0, 1, 2}
        if name == "ablation_scorer":  # the full training of configs/cola.yaml
            assert {(c.task.max_train_samples, c.task.max_eval_samples, c.train.epochs) for c in configs} == {
                (None, None, 3.0)}
            assert {c.schedule.name for c in configs} == {"dora"}
        if name == "ablation_budget":
            assert {(c.adapter.r0, c.budget.target_rank, c.schedule.name) for c in configs} == {
                (6, 1.0, "dora"), (6, 2.0, "dora"), (6, 4.0, "dora")}
        if name == "ablation_budget_constant":
            assert {(c.adapter.r0, c.schedule.name) for c in configs} == {(1, "constant"), (2, "constant"),
                                                                          (4, "constant")}
    assert read_report_block(STUDIES / "ablation_scorer.yaml")["reference"] == {"scorer.name": "magnitude"}
    assert read_report_block(STUDIES / "ablation_schedule.yaml")["reference"] == {"schedule.name": "dora"}
    budget = read_report_block(STUDIES / "ablation_budget.yaml")
    assert budget["factors"] == ["schedule.name", "final_rank"]
    assert budget["include"] == ["ablation_budget_constant.yaml"]


def test_bad_report_blocks_and_references(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {REPO / 'configs' / 'cola.yaml'}\nreport:\n  referense: {{scorer.name: magnitude}}\n")
    with pytest.raises(ConfigError, match="report.referense: unknown key; allowed: reference, factors, include"):
        read_report_block(bad)
    bad.write_text("report:\n  reference: [magnitude]\n")
    with pytest.raises(ConfigError, match="must map config keys to one value each"):
        read_report_block(bad)
    groups = [("magnitude", "dora"), ("sensitivity", "dora"), ("magnitude", "linear"), ("sensitivity", "linear")]
    factors = ["scorer.name", "schedule.name"]
    # a partial reference: each group against the reference scorer with the same schedule
    assert report.references(groups, factors, {"scorer.name": "magnitude"}) == {
        ("sensitivity", "dora"): ("magnitude", "dora"), ("sensitivity", "linear"): ("magnitude", "linear")}
    assert report.references(groups, factors, {"scorer.name": "magnitude", "schedule.name": "dora"}) == {
        g: ("magnitude", "dora") for g in groups[1:]}
    with pytest.raises(ConfigError, match="'seed' is not a factor of this study; factors: scorer.name, schedule"):
        report.references(groups, factors, {"seed": 0})
    with pytest.raises(ConfigError, match="scorer.name=magnitud is not in the study; it has magnitude, sensitivity"):
        report.references(groups, factors, {"scorer.name": "magnitud"})


def test_repeats_are_whole_configurations_not_groups() -> None:
    """A repeat is the same configuration and seed run twice; grouping by fewer factors than vary
    (here only the scorer, while the schedule varies too) must not drop distinct runs."""
    from dora_lab.report.compare import drop_repeats
    from dora_lab.report.io import Run

    runs = [Run("s", n, seed, value, {"scorer.name": scorer, "schedule.name": sched, "output_dir": out})
            for n, seed, value, scorer, sched, out in [
                (0, 0, 0.1, "a", "dora", "x"), (1, 0, 0.1, "a", "dora", "y"),  # a repeat: only a path differs
                (2, 1, 0.3, "a", "dora", "x"), (3, 0, 0.2, "b", "dora", "x"),
                (4, 0, 0.4, "a", "linear", "x")]]  # same scorer and seed, other schedule: not a repeat
    kept, repeats = drop_repeats(runs)
    assert [r.trial for r in kept] == [0, 2, 3, 4]
    assert [(r["trial"], r["reason"]) for r in repeats] == [
        (1, "repeats trial 0 (same configuration and seed); left out")]



def test_mlflow_shows_the_answer_from_the_printed_link(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Through a real MLflow server (REST): the parent run's and the experiment's descriptions hold the
    per-group table (n, mean, sd, 95% CI: recomputed here from the Optuna trials), the paired comparison
    and the report's link; the saved view groups by the study's factor with a bar and a scatter chart;
    each group's runs share a colour no other group has; one duration per trial (metric, metrics.json,
    trials.csv); the per-trial peak memory; allocations.png on the parent; the report link printed
    first; the printed report command reproduces the report as typed."""
    name = "ablation_schedule"
    sets = ["study.space.seed={type: categorical, choices: [0, 1]}",
            "study.space.schedule.name={type: categorical, choices: [dora, linear]}", "study.name=answer"]
    with serve_mlflow(f"sqlite:///{env['root'] / 'answer.db'}", env["root"] / "answer-artifacts") as server:
        run_study(env, name, *sets, f"study.tracking_uri={server}")
        printed = capsys.readouterr().out
        api = f"{server}/api/2.0/mlflow"
        exp = get(f"{api}/experiments/get-by-name?experiment_name=answer")["experiment"]
        runs = post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags_of = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    (parent,) = [t for t in tags_of if t.get("dora_lab.role") == "study"]
    children = [(r, t) for r, t in zip(runs, tags_of, strict=True) if t.get("dora_lab.role") == "trial"]
    study = optuna.load_study(study_name="answer", storage=f"sqlite:///{env['out'] / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and len(children) == 4

    # the descriptions: the numbers, recomputed from the trials
    note = parent["mlflow.note.content"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.note.content"] == note
    for schedule in ("dora", "linear"):
        values = [t.value for t in done if t.params["schedule.name"] == schedule]
        mean, sd = statistics.mean(values), statistics.stdev(values)
        half = sps.t.ppf(0.975, 1) * sd / math.sqrt(2)
        row = f"| {schedule} | 2 | {mean:.4f} | {sd:.4f} | [{mean - half:.4f}, {mean + half:.4f}] |"
        assert row in note, (row, note)
    diffs = [next(t.value for t in done if t.params == {"schedule.name": "linear", "seed": s}) -
             next(t.value for t in done if t.params == {"schedule.name": "dora", "seed": s}) for s in (0, 1)]
    p = sps.ttest_rel([d for d in diffs], [0.0, 0.0]).pvalue
    assert f"| linear | 2 | {statistics.mean(diffs):.4f} |" in note and f"| {p:.4f} | {p:.4f} |" in note
    stuck = all(t.value <= 0 for t in done)  # tiny runs often sit at the majority class: then it says so
    assert ("**Warning: did not learn: every run sat at the majority class" in note) == stuck
    parent_id = next(r["info"]["run_id"] for r, t in zip(runs, tags_of, strict=True) if t is parent)
    report_link = (f"#/experiments/{exp['experiment_id']}/runs/{parent_id}/artifactPath/report/report.html"
                   "?workflowType=machine_learning")
    assert f"[report.html]({report_link})" in note and "**Best trial:** [trial " in note

    # the saved view: grouped by the factor, a bar and a scatter chart; a colour per group
    (view,) = [json.loads(v) for k, v in ((t["key"], t["value"]) for t in exp["tags"])
               if k.startswith("mlflow.sharedViewState.")]
    assert view["groupBy"] == {"aggregateFunction": "average",
                               "groupByKeys": [{"mode": "param", "groupByData": "schedule.name"}]}
    charts = {c["type"]: c for c in view["compareRunCharts"]}
    assert charts["BAR"]["metricKey"] == "objective" and view["useGroupedValuesInCharts"] is False
    assert (charts["SCATTER"]["xaxis"]["key"], charts["SCATTER"]["yaxis"]["key"]) == ("adapter_parameters_final",
                                                                                       "objective")
    assert {c["metricSectionId"] for c in charts.values()} == {s["uuid"] for s in view["compareRunSections"]}
    colour = {t["schedule"]: set() for _, t in children}
    for run, t in children:
        colour[t["schedule"]].add(t["mlflow.runColor"])
        assert {p["key"]: p["value"] for p in run["data"]["params"]}["schedule.name"] == t["schedule"]
    assert all(len(c) == 1 for c in colour.values()) and colour["dora"] != colour["linear"]

    # one duration per trial, and its own peak memory
    summary = {r["trial"]: r for r in csv.DictReader((Path(str(done[0].user_attrs["run_dir"])).parent / "summary"
                                                      / "trials.csv").open())}
    for run, t in children:
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        folder = json.loads((Path(t["dora_lab.run_dir"]) / "metrics.json").read_text())
        assert metrics["minutes"] == folder["minutes"] == float(summary[t["trial"]]["minutes"])
        assert folder["minutes"] == round(folder["minutes"], 2)
        assert folder["peak_memory_source"] == "process_peak_rss_since_reset"
        assert metrics["peak_memory_mb"] == pytest.approx(folder["peak_memory_mb"], abs=0.1)

    # every trial's allocation side by side on the parent, each heatmap at least 250 x 120 px
    figure = Path(str(done[0].user_attrs["run_dir"])).parent / "summary" / "allocations.png"
    width, height = _png_size(figure.read_bytes())
    assert width / 2 >= 250 and height / 2 >= 120  # 4 panels: 2 x 2

    # printed: the report first, then the answer, then the runs; the report command as typed
    links = [line.split(":", 1)[0] for line in printed.splitlines() if line.startswith("MLflow ")]
    assert links[-5:] == ["MLflow report of this study", "MLflow answer (per-group mean, sd, CI; paired tests; best "
                          "trial; updated as trials finish)", "MLflow runs of this study", "MLflow charts (objective "
                          "by group, against adapter size)", "MLflow compare (4 complete trials)"]
    command = next(line for line in printed.splitlines() if line.startswith("report (the config's report: block): "))
    command = command.removeprefix("report (the config's report: block): ")
    assert command.startswith(f"cd {os.getcwd()} && python -m dora_lab.report ") and "--set study.name=answer" in command


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
