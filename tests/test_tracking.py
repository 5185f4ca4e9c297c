"""The MLflow tracker, the Optuna reporter and the pictures, on a real SQLite MLflow store with
synthetic runs (no training): exact metric histories, statuses, the parent found again by tag."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from matplotlib.axes import Axes
from mlflow import MlflowClient

from dora_lab.plan.setup import prepare
from dora_lab.run.callbacks import RunInfo, RunResult
from dora_lab.run.config import RunConfig
from dora_lab.run.config_yaml import ConfigError
from dora_lab.study.trial import OptunaReporter, objective_value
from dora_lab.track.links import ROLE_TAG, STUDY_TAG, compare_url, experiment_url, safe_url
from dora_lab.track.logger import run_name
from dora_lab.track.plots import allocation_grid
from dora_lab.track.tables import markdown_table, write_table
from dora_lab.track.tracker import (
    CLOSED_TAG,
    TOLD_GRACE_S,
    UID_TAG,
    WORKER_TAG,
    StudyTracker,
    worker_may_still_end,
)

UID = "20260101-000000-00000001"  # a study identity, as dora_lab.study.open_study makes them
ALLOCATION = {f"bert.encoder.layer.{i}.{m}": (i + j) % 4 for i in range(2)
              for j, m in enumerate(["attention.self.query", "attention.self.value", "output.dense"])}


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudyTracker]:
    root = tmp_path_factory.mktemp("tracking")
    yield StudyTracker(f"sqlite:///{root / 'mlflow.db'}", "exp", "s1", artifact_root=root / "art")


def _info(run_dir: Path) -> RunInfo:
    return RunInfo(config={}, run_dir=run_dir, total_steps=6, steps_per_epoch=3, trainable_parameters=100,
                   adapter_parameters=50, budget_curve=[12, 12, 10, 8, 8, 8], budget_unit="components")


def test_parent_is_found_again_by_tag(tracker: StudyTracker) -> None:
    first = tracker.parent_run(UID, {"config": "a.yaml"})
    assert tracker.parent_run(UID) == first  # again: the same run, no duplicate
    # a parent created by another process a moment later (a race) loses against the oldest
    tracker.client.create_run(tracker.experiment_id, tags={STUDY_TAG: "s1", ROLE_TAG: "study", UID_TAG: UID})
    assert tracker.parent_run(UID) == first
    other = StudyTracker(tracker.uri, "exp", "s2")
    assert other.experiment_id == tracker.experiment_id and other.parent_run(UID) != first
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.artifact_location.startswith("file://") and exp.artifact_location.endswith("/art/exp")


def test_the_experiment_is_a_model_training_one_and_its_link_opens_the_runs_table(tracker: StudyTracker) -> None:
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    old = tracker.client.create_experiment("made-by-hand")  # an experiment from before: tagged when a study uses it
    assert "mlflow.experimentKind" not in tracker.client.get_experiment(old).tags
    assert StudyTracker(tracker.uri, "made-by-hand", "s9").experiment_id == old
    assert tracker.client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment_url("http://h:1/", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
    # the study's trials, flat (their parent filtered out), best first: the UI reads these URL parameters
    found = "tags.%60dora_lab.role%60%20%3D%20%27trial%27%20and%20tags.%60dora_lab.study%60%20%3D%20%27s1%27"
    assert tracker.runs_url() == f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs" \
        f"?workflowType=machine_learning&searchFilter={found}&orderByKey=metrics.%60objective%60&orderByAsc=false"
    assert tracker.runs_url(maximize=False).endswith("&orderByAsc=true")
    # the saved view: the same search and order, and the columns that answer the study's question
    key = tracker.save_view("matthews_correlation", ["scorer.name", "seed"], maximize=False)
    view = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags[f"mlflow.sharedViewState.{key}"])
    assert view == {"searchFilter": "tags.`dora_lab.role` = 'trial' and tags.`dora_lab.study` = 's1'",
                    "orderByKey": "metrics.`objective`", "orderByAsc": True,
                    "selectedColumns": ["attributes.`Dataset`", "metrics.`objective`",
                                        "metrics.`best_matthews_correlation`", "metrics.`adapter_parameters_final`",
                                        "metrics.`minutes`", "params.`scorer.name`", "params.`seed`"]}
    assert tracker.runs_url() == f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs" \
        f"?workflowType=machine_learning&viewStateShareKey={key}"  # alone: a search in the URL overrides a view
    tracker.view_key = None
    assert compare_url("http://h:1", "7", ["a1", "b2"]) == "http://h:1/#/compare-runs?" \
        "runs=%5B%22a1%22%2C%20%22b2%22%5D&experiments=%5B%227%22%5D&workflowType=machine_learning"


def test_parent_params_are_logged_once_and_every_run_has_the_context_tags(tracker: StudyTracker,
                                                                         tmp_path: Path) -> None:
    uid = "20260103-000000-00000003"
    parent = tracker.parent_run(uid, params={"study.n_trials": "3", "study.sampler": "tpe"})
    # a resume with another n_trials keeps the first (a param cannot change) and adds new keys
    assert tracker.parent_run(uid, params={"study.n_trials": "1", "study.timeout": "60"}) == parent
    c = MlflowClient(tracker.uri)
    assert c.get_run(parent).data.params == {"study.n_trials": "3", "study.sampler": "tpe", "study.timeout": "60"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                          check=True).stdout.strip()
    child = tracker.start_trial(parent, 0, RunConfig(), tmp_path).run_id
    for run_id in (parent, child):
        tags = c.get_run(run_id).data.tags
        assert tags["mlflow.source.git.commit"] == head  # this checkout's, not the entry point's (pytest)
        assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"


def test_a_new_study_of_the_same_name_gets_its_own_parent(tracker: StudyTracker) -> None:
    old = tracker.parent_run(UID)
    # its optuna.db deleted, the study starts again: same name, new identity, so a parent of its own
    new = tracker.parent_run("20260102-000000-00000002")
    assert new != old and tracker.parent_run("20260102-000000-00000002") == new
    assert tracker.client.get_run(new).data.tags[UID_TAG] == "20260102-000000-00000002"
    assert tracker.client.get_run(old).data.tags[UID_TAG] == UID  # the old one is left as it was
    # a parent written before identities existed (no uid tag) is never adopted
    untagged = tracker.client.create_run(tracker.experiment_id, tags={STUDY_TAG: "s3", ROLE_TAG: "study"})
    assert StudyTracker(tracker.uri, "exp", "s3").parent_run(UID) != untagged.info.run_id


def test_trial_logger_streams_metrics_and_artifacts(tracker: StudyTracker, tmp_path: Path) -> None:
    parent = tracker.parent_run(UID)
    cfg = RunConfig()
    logger = tracker.start_trial(parent, 7, cfg, tmp_path)
    logger.log_config(cfg)
    logger.on_train_begin(_info(tmp_path))
    for step in range(6):
        logger.on_step(step, {"train_loss": 1.0 / (step + 1), "lr": 0.1 * step, "active_components": 12 - step,
                              "active_parameters": 100.0 - step, "budget": 12.0, "epoch": 0.0})
        if step in (2, 5):
            logger.on_evaluate(step + 1, {"matthews_correlation": step / 10, "accuracy": 0.5, "step": step + 1.0})
    (tmp_path / "allocation.json").write_text(json.dumps(ALLOCATION))
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    logger.on_train_end(RunResult("matthews_correlation", 0.5, 6, {"matthews_correlation": 0.5}, steps=6,
                                  active_components_final=8, adapter_parameters_final=40, seconds=60))
    logger.finish("COMPLETE", value=0.5)

    c = MlflowClient(tracker.uri)
    run = c.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["trial"] == "7"
    assert run.data.tags["scorer"] == "magnitude" and run.data.tags["budget"] == "rank 2"
    assert run.data.tags["dora_lab.adapter_dir"] == str((tmp_path / "adapter").resolve())
    assert run.data.params["adapter.r0"] == "3" and run.data.params["model.trainable"] == '["classifier", "pooler"]'
    loss = sorted((m.step, m.value) for m in c.get_metric_history(logger.run_id, "train/loss"))
    assert loss == [(s, pytest.approx(1.0 / s)) for s in range(1, 7)]
    assert [(m.step, m.value) for m in c.get_metric_history(logger.run_id, "eval/matthews_correlation")] == \
        [(3, pytest.approx(0.2)), (6, pytest.approx(0.5))]
    active = sorted((m.step, m.value) for m in c.get_metric_history(logger.run_id, "budget/active_parameters"))
    assert active[0] == (0, 50) and active[-1] == (6, 95)  # at start: the adapter's, then per step
    assert len(c.get_metric_history(logger.run_id, "train/lr")) == 6
    assert {"train_loss", "matthews_correlation", "active_parameters"}.isdisjoint(run.data.metrics)
    # one-off values at step 0 (a value in the UI, not a one-point curve at the run's last step)
    one_off = {"objective": 0.5, "minutes": 1.0, "best_matthews_correlation": 0.5, "best_step": 6,
               "active_components_final": 8, "adapter_parameters_final": 40, "trainable_parameters": 100}
    for key, value in one_off.items():
        assert [(m.step, m.value) for m in c.get_metric_history(logger.run_id, key)] == [(0, value)], key
    files = {a.path for a in c.list_artifacts(logger.run_id)}
    # the figures at the artifact root: MLflow's compare page shows only top-level artifacts side by side
    assert {"allocation.json", "config.yaml", "rank_heatmap.png", "budget.png"} <= files


def test_figures_are_titled_with_their_run(tracker: StudyTracker, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    titles: list[str] = []
    monkeypatch.setattr(Axes, "set_title", lambda self, label, *a, **k: titles.append(label))
    cfg = RunConfig.model_validate({"scorer": {"name": "sensitivity"}, "seed": 1})
    logger = tracker.start_trial(tracker.parent_run(UID), 3, cfg, tmp_path, {"scorer.name": "sensitivity", "seed": 1})
    logger.on_train_begin(_info(tmp_path))
    (tmp_path / "allocation.json").write_text(json.dumps(ALLOCATION))
    logger.finish("COMPLETE", value=0.5)
    heatmap, budget = (" ".join(t.split()) for t in titles)  # wrapped to the figure's width
    run = "sensitivity · seed 1 (t3) scorer sensitivity · schedule dora · seed 1 · trial 3"
    assert heatmap == f"{run} final rank per matrix ({sum(ALLOCATION.values())} components)"
    assert budget == f"{run} budget over training"
    assert {"rank_heatmap.png", "budget.png"} <= {a.path for a in MlflowClient(tracker.uri).list_artifacts(logger.run_id)}


def test_runs_are_named_for_their_searched_values(tracker: StudyTracker, tmp_path: Path) -> None:
    parent = tracker.parent_run(UID)
    searched = {"scorer.name": "sensitivity", "seed": 1, "train.lr": 0.0030012, "schedule.compact": False}
    logger = tracker.start_trial(parent, 3, RunConfig(), tmp_path, searched)
    c = MlflowClient(tracker.uri)
    run = c.get_run(logger.run_id)
    assert run.info.run_name == "sensitivity · seed 1 · lr 0.003 · compact False (t3)"
    assert run.data.tags["trial"] == "3"  # the number stays a tag too, for filtering
    assert c.get_run(parent).info.run_name == "s1"  # the parent keeps the study's name
    assert run_name({}, 4) == "trial 4"  # nothing searched (or failed before the values were drawn)


def test_effective_scorer_schedule_and_regulariser_settings_are_params(tracker: StudyTracker, tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({"scorer": {"name": "smoothed_uncertainty", "params": {"beta2": 0.5}},
                                    "schedule": {"warmup": 0.5, "final": 2}})
    logger = tracker.start_trial(tracker.parent_run(UID), 5, cfg, tmp_path)
    logger.log_config(cfg)
    logger.on_train_begin(_info(tmp_path))  # 6 steps
    params = MlflowClient(tracker.uri).get_run(logger.run_id).data.params
    assert params["scorer.params.beta2"] == "0.5" and "scorer.params.beta1" not in params  # the config's own
    assert params["scorer.effective.beta1"] == "0.85" and params["scorer.effective.beta2"] == "0.5"
    assert (params["schedule.effective.total_steps"], params["schedule.effective.warmup_steps"],
            params["schedule.effective.final_steps"]) == ("6", "3", "2")
    assert params["regularizer.effective.weight"] == "0.1" and params["regularizer.effective.stops_when_frozen"] == "True"
    off = RunConfig.model_validate({"regularizer": {"name": None}})
    logger = tracker.start_trial(tracker.parent_run(UID), 6, off, tmp_path)
    logger.log_config(off)
    params = MlflowClient(tracker.uri).get_run(logger.run_id).data.params
    assert params["scorer.effective.beta"] == "0.9"  # magnitude's default EMA
    assert params["regularizer.effective.weight"] == "0.0" and "regularizer.effective.stops_when_frozen" not in params
    sora = RunConfig.model_validate({"method": {"name": "sora", "params": {"lam": 0.2}}})
    logger = tracker.start_trial(tracker.parent_run(UID), 7, sora, tmp_path)
    logger.log_config(sora)
    params = MlflowClient(tracker.uri).get_run(logger.run_id).data.params
    # the allocation method's every hyper-parameter: the config's lam, SoRA's default threshold
    assert params["method.effective.lam"] == "0.2" and params["method.effective.threshold"] == "0.0"


@pytest.mark.parametrize(("state", "status", "tag"), [
    ("PRUNED", "KILLED", "PRUNED"), ("FAIL", "FAILED", "FAIL"), ("INTERRUPTED", "KILLED", "FAIL")])
def test_finish_states(tracker: StudyTracker, tmp_path: Path, state: str, status: str, tag: str) -> None:
    logger = tracker.start_trial(tracker.parent_run(UID), 1, RunConfig(), tmp_path)
    logger.finish(state, reason="why")
    run = MlflowClient(tracker.uri).get_run(logger.run_id)
    assert run.info.status == status and run.data.tags["state"] == tag
    assert run.data.tags["prune_reason" if state == "PRUNED" else "fail_reason"] == "why"
    tracker.mark_failed(logger.run_id, "stale")  # a closed run is left alone
    assert MlflowClient(tracker.uri).get_run(logger.run_id).info.status == status


def test_an_artifact_that_cannot_be_logged_does_not_change_the_outcome(tracker: StudyTracker, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    logger = tracker.start_trial(tracker.parent_run(UID), 3, RunConfig(), tmp_path)

    def broken(adapter: bool = False) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(logger, "_artifacts", broken)
    logger.finish("COMPLETE", value=0.5)
    run = MlflowClient(tracker.uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
    assert run.data.tags["dora_lab.artifact_error"] == "OSError: disk full"
    assert run.data.metrics["objective"] == 0.5


def test_mark_failed_closes_a_running_child(tracker: StudyTracker, tmp_path: Path) -> None:
    logger = tracker.start_trial(tracker.parent_run(UID), 2, RunConfig(), tmp_path)
    tracker.mark_failed(logger.run_id, "worker died")
    run = MlflowClient(tracker.uri).get_run(logger.run_id)
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == "worker died"


def test_the_study_end_closes_a_told_trials_run_its_worker_never_ended(tracker: StudyTracker,
                                                                        tmp_path: Path) -> None:
    """A worker that stops between Optuna's tell (COMPLETE) and the end of its MLflow run leaves the
    run RUNNING; the study's summary closes it FINISHED with Optuna's state and says why.  A run whose
    worker is another live process (a second invocation on the study, still ending it) is left alone;
    one whose worker process is gone is closed."""
    parent = tracker.parent_run("20260101-000000-00000009")
    open_run = tracker.start_trial(parent, 0, RunConfig(), tmp_path / "a").run_id
    ended = tracker.start_trial(parent, 1, RunConfig(), tmp_path / "b")
    ended.finish("COMPLETE", value=0.4)
    client = MlflowClient(tracker.uri)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    others = {}
    for number, proc in ((2, live), (3, gone)):
        others[number] = tracker.start_trial(parent, number, RunConfig(), tmp_path / str(number)).run_id
        client.set_tag(others[number], WORKER_TAG, f"{socket.gethostname()}:{proc.pid}")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for run_id, value in ((open_run, 0.5), (ended.run_id, 0.4), (others[2], 0.3), (others[3], 0.2)):
        study.add_trial(optuna.trial.create_trial(params={"x": value}, distributions=dist, value=value,
                                                  user_attrs={"mlflow_run_id": run_id}))
    try:
        tracker.summarize(parent, study, "accuracy", tmp_path / "summary")
    finally:
        live.kill()
        live.wait()
    run = client.get_run(open_run)
    assert (run.info.status, run.data.tags["state"], run.data.tags.get(CLOSED_TAG)) == ("FINISHED", "COMPLETE", "true")
    assert CLOSED_TAG not in client.get_run(ended.run_id).data.tags  # a run its worker ended is left alone
    assert client.get_run(others[2]).info.status == "RUNNING"  # its worker is alive: it ends the run
    assert client.get_run(others[3]).data.tags.get(CLOSED_TAG) == "true"


def test_a_worker_on_another_host_gets_a_grace_period_after_the_tell() -> None:
    told = datetime(2026, 1, 1, 12, 0, 0)
    far = "another-host.example:123"
    assert worker_may_still_end(far, told, now=told + timedelta(seconds=TOLD_GRACE_S - 1))
    assert not worker_may_still_end(far, told, now=told + timedelta(seconds=TOLD_GRACE_S + 1))
    assert not worker_may_still_end(far, None)  # no tell time: nothing to wait for
    assert not worker_may_still_end(f"{socket.gethostname()}:{os.getpid()}", told, now=told)  # this process


def test_allocation_grid_is_layers_by_module_types() -> None:
    rows, cols, grid = allocation_grid(ALLOCATION)
    assert rows == ["0", "1"] and cols == ["attention.self.query", "attention.self.value", "output.dense"]
    assert grid == [[(i + j) % 4 for j in range(3)] for i in range(2)]
    _, _, sparse = allocation_grid({"model.layers.0.q_proj": 1, "model.layers.1.v_proj": 2})
    assert sparse[0][0] == 1 and math.isnan(sparse[0][1]) and sparse[1][1] == 2


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_reporter_reports_and_prunes(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    trial = study.ask()
    reporter = OptunaReporter(trial, "matthews_correlation")
    reporter.on_train_begin(_info(tmp_path))
    assert reporter.eligible_from == 4  # the first step with the final budget (8)
    with pytest.raises(optuna.TrialPruned, match="pruned at step 3: matthews_correlation = 0.2500"):
        reporter.on_evaluate(3, {"matthews_correlation": 0.25, "step": 3.0})
    assert trial.user_attrs["prune_reason"].startswith("pruned at step 3")
    assert study.trials[0].intermediate_values == {3: 0.25}
    with pytest.raises(ConfigError, match="'f1' is not measured; the evaluation gives matthews_correlation"):
        OptunaReporter(trial, "f1").on_evaluate(3, {"matthews_correlation": 0.25, "step": 3.0})


def test_objective_value_best_after_pruning_or_final() -> None:
    history = [{"matthews_correlation": 0.9, "step": 2.0}, {"matthews_correlation": 0.5, "step": 4.0},
               {"matthews_correlation": 0.3, "step": 6.0}, {"matthews_correlation": 0.4, "step": 8.0}]
    setup = prepare(Path(__file__).parents[1] / "configs" / "cola.yaml")
    assert objective_value(setup, history, eligible_from=4) == [0.5]  # 0.9 came before the budget was met
    setup.study.objective = "final"
    assert objective_value(setup, history, eligible_from=4) == [0.4]  # the last evaluation, not the best
    setup.study.objective, setup.study.direction = "best", "minimize"
    assert objective_value(setup, history, eligible_from=4) == [0.3]


def test_tables_and_safe_urls(tmp_path: Path) -> None:
    rows = [{"trial": 0, "state": "COMPLETE", "value": 0.123456, "reason": ""},
            {"trial": 1, "state": "FAIL", "value": None, "reason": "ValueError: a|b"}]
    write_table(rows, tmp_path / "t.csv", tmp_path / "t.md")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["trial,state,value,reason", "0,COMPLETE,0.123456,",
                                                             "1,FAIL,,ValueError: a|b"]
    assert "| 0 | COMPLETE | 0.1235 |  |" in (tmp_path / "t.md").read_text()
    assert "ValueError: a/b" in markdown_table(rows)
    assert safe_url("postgresql://dora:secret@127.0.0.1:5432/db") == "postgresql://dora:***@127.0.0.1:5432/db"
    assert safe_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_the_convergence_flags_are_tags_of_the_trials_run(tracker: StudyTracker, tmp_path: Path) -> None:
    """metrics.json's checks (dora_lab.run.convergence) become tags, so the MLflow runs table can filter
    on them (tags.`dora_lab.still_rising` = 'true'); a flag not judged is 'null'."""
    logger = tracker.start_trial(tracker.parent_run(UID), 8, RunConfig(), tmp_path)
    logger.on_train_begin(_info(tmp_path))
    logger.on_train_end(RunResult("matthews_correlation", 0.3, 6, {"matthews_correlation": 0.3}, steps=6,
                                  checks={"still_rising": True, "at_majority": None, "window": 3},
                                  environment={"torch": "2.13.0+cpu", "commit": None, "threads": 1}))
    logger.finish("COMPLETE", value=0.3)
    tags = MlflowClient(tracker.uri).get_run(logger.run_id).data.tags
    assert tags["dora_lab.still_rising"] == "true" and tags["dora_lab.at_majority"] == "null"
    assert "dora_lab.window" not in tags
    # what it ran on (dora_lab.run.environment), a key without a value (no commit) left out
    assert tags["dora_lab.env.torch"] == "2.13.0+cpu" and tags["dora_lab.env.threads"] == "1"
    assert "dora_lab.env.commit" not in tags
