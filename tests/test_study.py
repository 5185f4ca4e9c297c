"""End-to-end studies on the tiny BERT and a slice of the shared CoLA, with real stores: SQLite for
Optuna and MLflow, a real ``mlflow server`` (REST), and PostgreSQL when DORA_LAB_TEST_POSTGRES is set.

Every study here shares one output folder (one optuna.db, one mlflow.db: MLflow's first migration
costs seconds) and has its own name.  A tiny trial is 8 optimizer steps with two evaluations.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow.data
import optuna
import pandas
import pytest
import torch
from mlflow import MlflowClient
from mlflow_server import get, post
from mlflow_server import mlflow_server as serve_mlflow
from tiny import COLA, make_tiny_model_dir, tiny_overrides

from dora_lab.core.scorers import SCORERS
from dora_lab.export.cli import main as export_main
from dora_lab.plan.setup import prepare
from dora_lab.plan.space import db_url
from dora_lab.run.data import load_splits
from dora_lab.run.tasks import get_task
from dora_lab.studies import main
from dora_lab.study.runner import open_study, study_folder

REPO = Path(__file__).resolve().parents[1]
COLA_YAML = str(REPO / "configs" / "cola.yaml")
N_MATRICES = 2 * 6  # the tiny BERT: 2 layers x 6 adapted linears
STEPS = 8  # 64 sentences / batch 16 x 2 epochs


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is faster under contention
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    root = tmp_path_factory.mktemp("study")
    yield {"model": make_tiny_model_dir(root / "tiny"), "out": root / "out", "root": root}
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old


def args(env: dict[str, Path], name: str, n: int, *extra: str) -> list[str]:
    # cola's study searches schedule.interval: a --set of it would be refused (tiny_overrides sets it)
    tiny = [s for s in tiny_overrides(env["model"], env["out"], train=64, evals=64) if not s.startswith("schedule.interval=")]
    sets = [*tiny, "train.eval_every=4",
            f"study.name={name}", f"study.n_trials={n}", *extra]
    return [COLA_YAML, *[x for s in sets for x in ("--set", s)]]


def client(env: dict[str, Path], uri: str | None = None) -> MlflowClient:
    return MlflowClient(uri or f"sqlite:///{env['out'] / 'mlflow.db'}")


def runs(c: MlflowClient, name: str) -> tuple[Any, list[Any]]:
    exp = c.get_experiment_by_name(name)
    assert exp is not None
    found = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags.get("dora_lab.role") == "study"]
    assert len(parents) == 1, "exactly one parent run per study"
    children = sorted((r for r in found if r.data.tags.get("dora_lab.role") == "trial"),
                      key=lambda r: int(r.data.tags["trial"]))
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    return parents[0], children


def load(env: dict[str, Path], name: str, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{env['out'] / 'optuna.db'}")


def test_three_trials_then_resume(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(env, "basic", 3)) == 0
    printed = capsys.readouterr().out
    ui = next(line.strip() for line in printed.splitlines() if " -m mlflow ui " in line)
    assert shlex.split(ui) == [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{env['out'] / 'mlflow.db'}", "--host", "127.0.0.1", "--port", "5000"]
    # works as printed, from no activated virtualenv: this interpreter runs MLflow's CLI
    check = subprocess.run([*shlex.split(ui)[:3], "--version"], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
    assert check.returncode == 0 and "version" in check.stdout.lower()
    assert "| trial | state | value |" in printed
    c = client(env)
    parent, children = runs(c, "basic")
    assert [r.data.tags["trial"] for r in children] == ["0", "1", "2"]
    study = load(env, "basic")
    for run, trial in zip(children, study.trials, strict=True):
        assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
        # named for the searched values, in the space's order, then the trial's number
        assert run.info.run_name.startswith(f"r0 {trial.params['adapter.r0']} · {trial.params['schedule.name']} · ")
        assert run.info.run_name.endswith(f" (t{trial.number})")
        # params: the flattened resolved config, the sampled values included
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        assert run.data.params["adapter.r0"] == str(trial.params["adapter.r0"])
        assert run.data.params["budget.target_rank"] == "2.0" and run.data.tags["budget"] == "rank 2"
        assert {"task", "model", "scorer", "schedule", "seed"} <= set(run.data.tags)
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run.data.tags["dora_lab.adapter_dir"] == str((run_dir / "adapter").resolve())
        assert (run_dir / "adapter").is_dir()  # written by train_run, read by the export tool
        # metric histories at optimizer steps; the budget reaches the target: 2 per matrix
        loss = c.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
        mcc = c.get_metric_history(run.info.run_id, "eval/matthews_correlation")
        assert sorted(m.step for m in mcc) == [0, 4, 8]  # step 0: eval.at_start, the model before training
        active = sorted(c.get_metric_history(run.info.run_id, "budget/active_components"), key=lambda m: m.step)
        assert active[0].value == N_MATRICES * trial.params["adapter.r0"] and active[-1].value == N_MATRICES * 2
        assert len(c.get_metric_history(run.info.run_id, "train/lr")) == STEPS
        assert trial.value == pytest.approx(max(m.value for m in mcc if m.step > 0))  # the best after pruning ended
        allocation = json.loads((run_dir / "allocation.json").read_text())
        assert sum(allocation.values()) == N_MATRICES * 2 == trial.user_attrs["active_components"]
        arts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "allocation.json", "rank_heatmap.png", "budget.png"} <= arts
    summary = {a.path for a in c.list_artifacts(parent.info.run_id, "summary")}
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "summary/plots")}
    assert {"summary/trials.csv", "summary/trials.md"} <= summary
    assert {"summary/plots/optimization_history.png", "summary/plots/param_importances.png",
            "summary/plots/parallel_coordinate.png"} <= plots
    assert parent.data.tags["best.trial"] == str(study.best_trial.number) and parent.info.run_name == "basic"
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 3
    # the best trial as tags; no metric copies of a child's on the parent (they would join the trials' charts)
    assert float(parent.data.tags["best.value"]) == pytest.approx(study.best_value)
    assert not any(k.startswith("best") for k in parent.data.metrics)
    # the study's settings as the parent's params; the standard context tags on every run
    settings = parent.data.params
    assert (settings["study.sampler"], settings["study.sampler.n_startup_trials"], settings["study.pruner"],
            settings["study.n_trials"], settings["study.timeout"]) == ("tpe", "3", "median", "3", "840.0")
    assert json.loads(settings["study.space.train.lr"]) == {"type": "float", "low": 1.5e-3, "high": 6.0e-3,
                                                            "log": True}
    assert settings["study.config"] == COLA_YAML and settings["study.metric"] == "matthews_correlation"
    for run in (parent, *children):
        assert {"mlflow.source.git.commit", "mlflow.source.name", "mlflow.user"} <= set(run.data.tags)

    # the same command again: the same study and parent; numbering goes on, nothing duplicated
    assert main(args(env, "basic", 1)) == 0
    parent2, children = runs(client(env), "basic")
    assert parent2.info.run_id == parent.info.run_id
    assert [r.data.tags["trial"] for r in children] == ["0", "1", "2", "3"]
    assert [t.number for t in load(env, "basic").trials] == [0, 1, 2, 3]


BOOM = '''
from dora_lab import register_scorer

@register_scorer("boom")
def boom(layer):
    raise RuntimeError("boom: this scorer fails on purpose")
'''


def test_failed_trials_are_recorded_and_the_study_goes_on(env: dict[str, Path]) -> None:
    plugin = env["root"] / "boom_scorer.py"
    plugin.write_text(BOOM)
    grid = ["study.sampler=grid", "study.n_trials=null", f"plugins=[{plugin}]",
            "study.space={train.divergence_loss: {type: categorical, choices: [0.001, 10000.0]}, "
            "scorer.name: {type: categorical, choices: [magnitude, boom]}}"]
    try:
        assert main(args(env, "failing", 1, *grid)) == 0
        # running the finished grid again runs nothing
        assert main(args(env, "failing", 1, *grid)) == 0
    finally:
        SCORERS.remove("boom")
    study = load(env, "failing")
    assert len(study.trials) == 4  # the whole grid ran although three trials failed
    by_state: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert len(by_state["COMPLETE"]) == 1 and len(by_state["FAIL"]) == 3
    reasons = {(t.params["train.divergence_loss"], t.params["scorer.name"]): t.user_attrs["fail_reason"]
               for t in by_state["FAIL"]}
    assert reasons[(0.001, "magnitude")].startswith("DivergenceError: training diverged at step 0")
    assert reasons[(10000.0, "boom")] == "RuntimeError: boom: this scorer fails on purpose"
    _, children = runs(client(env), "failing")
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 3 and all(r.data.tags["state"] == "FAIL" for r in failed)
    assert {r.data.tags["fail_reason"] for r in failed} == set(reasons.values())


def test_missing_data_or_model_is_one_error_not_a_failed_study(env: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = env["root"] / "no_such_data"
    # the base config cannot load its data or model: refused before anything is stored
    assert main(args(env, "nodata", 2, f"task.data_dir={missing}")) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Nothing was started or stored" in err
    assert main(args(env, "nomodel", 2, f"model.name={env['root'] / 'no_such_model'}")) == 2
    assert "set model.name to its local folder" in capsys.readouterr().err
    # a max_length the model cannot take: refused before the first trial, not once per trial
    assert main(args(env, "toolong", 2, "task.max_length=4096")) == 2
    assert "task.max_length=4096 is longer than model" in capsys.readouterr().err
    # nothing stored: no such study in the storage (which an earlier test may or may not have made)
    stored = (optuna.get_all_study_names(f"sqlite:///{env['out'] / 'optuna.db'}")
              if (env["out"] / "optuna.db").exists() else [])
    assert not {"nodata", "nomodel", "toolong"} & set(stored)
    # a trial's own data folder is missing: that trial fails and the study stops, since every later
    # trial would fail alike; all of this run's trials failed, so the exit code says so
    space = f"study.space={{task.data_dir: {{type: categorical, choices: [{missing}]}}}}"
    # the base's data folder comes through study.overrides: a --set of a searched key is refused
    trialdata = args(env, "trialdata", 3, space, f"study.overrides.task.data_dir={COLA}")
    i = next(i for i, a in enumerate(trialdata) if a.startswith("task.data_dir="))
    assert main(trialdata[:i - 1] + trialdata[i + 1:]) == 1
    study = load(env, "trialdata")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert study.trials[0].user_attrs["fail_reason"].startswith("DataError")
    assert "stopping the study" in capsys.readouterr().err


def test_a_grid_whose_every_trial_fails_exits_with_1(env: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    grid = ["study.sampler=grid", "study.n_trials=null",
            "study.space={train.divergence_loss: {type: categorical, choices: [0.001, 0.002]}}"]
    assert main(args(env, "all_diverge", 1, *grid)) == 1  # a diverging trial is a result: the grid goes on
    out = capsys.readouterr()
    assert "0 finished trial(s) so far" in out.out and "all 2 trial(s) of this run failed" in out.err
    assert [t.state.name for t in load(env, "all_diverge").trials] == ["FAIL", "FAIL"]
    assert main(args(env, "all_diverge", 1, *grid)) == 0  # nothing left to run is not a failure


def test_two_workers_share_one_storage_and_parent(env: dict[str, Path]) -> None:
    assert main([*args(env, "workers", 2), "--workers", "2"]) == 0
    study = load(env, "workers")
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].params != study.trials[1].params  # each worker's sampler has its own seed
    _, children = runs(client(env), "workers")
    assert len(children) == 2
    workers = {r.data.tags["dora_lab.worker"] for r in children}
    assert len(workers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers


GRID4 = ["study.sampler={name: grid, seed: 0}", "study.pruner=none", "study.n_trials=null", "study.timeout=null",
         "study.space={seed: {type: categorical, choices: [0, 1, 2, 3]}}"]


def one_to_one(study: optuna.Study, c: MlflowClient, name: str) -> list[Any]:
    """Every Optuna trial has exactly one MLflow child run of the study's parent, with its number
    and state, and there is no other child; the children, in trial order."""
    _, children = runs(c, name)
    by_id = {r.info.run_id: r for r in children}
    assert len(by_id) == len(children) == len(study.trials), (len(children), len(study.trials))
    out = []
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["trial"] == str(t.number) and run.data.tags["state"] == t.state.name
        out.append(run)
    return out


def test_a_grid_on_two_workers_runs_every_point_exactly_once(env: dict[str, Path]) -> None:
    assert main([*args(env, "grid_workers", 1, *GRID4), "--workers", "2"]) == 0
    study = load(env, "grid_workers")
    # each point claimed once: four trials, no duplicate draw pruned, each with its MLflow run
    assert sorted(t.params["seed"] for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    one_to_one(study, client(env), "grid_workers")
    assert main([*args(env, "grid_workers", 1, *GRID4), "--workers", "2"]) == 0  # finished: runs nothing
    assert len(load(env, "grid_workers").trials) == len(study.trials)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_study_of_an_old_name_keeps_the_old_runs(env: dict[str, Path]) -> None:
    """optuna.db gone (here: a new storage, the same output_dir): the new study's trial 0 must not
    overwrite the old trial 0's folder nor log under the old parent run."""
    first = ["study.n_trials=1", f"study.storage=sqlite:///{env['root'] / 'reborn-1.db'}"]
    assert main(args(env, "reborn", 1, *first)) == 0
    (old_trial,) = load(env, "reborn", storage=first[1].split("=", 1)[1]).trials
    old_dir = Path(old_trial.user_attrs["run_dir"])
    old_files = _files(old_dir)
    assert "adapter/adapter_config.json" in old_files
    second = ["study.n_trials=1", f"study.storage=sqlite:///{env['root'] / 'reborn-2.db'}"]
    assert main(args(env, "reborn", 1, *second)) == 0
    (new_trial,) = load(env, "reborn", storage=second[1].split("=", 1)[1]).trials
    new_dir = Path(new_trial.user_attrs["run_dir"])
    assert new_trial.number == old_trial.number == 0 and new_dir != old_dir
    assert _files(old_dir) == old_files  # the old run's adapter and metrics untouched
    c = client(env)
    exp = c.get_experiment_by_name("reborn")
    assert exp is not None
    found = c.search_runs([exp.experiment_id])
    parents = {r.info.run_id: r for r in found if r.data.tags["dora_lab.role"] == "study"}
    assert len(parents) == 2  # one per study, each matched by the study's identity
    for trial, folder in ((old_trial, old_dir), (new_trial, new_dir)):
        child = c.get_run(trial.user_attrs["mlflow_run_id"])
        siblings = [r for r in found if r.data.tags.get("mlflow.parentRunId") == child.data.tags["mlflow.parentRunId"]]
        assert len(siblings) == 1  # no parent with two children called trial-000
        assert child.data.tags["dora_lab.adapter_dir"] == str((folder / "adapter").resolve())
        parent = parents[child.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["dora_lab.study_uid"] == folder.parent.name


def test_a_trial_never_writes_into_a_folder_holding_a_run(env: dict[str, Path]) -> None:
    cli = args(env, "squatted", 1)
    setup = prepare(cli[0], cli[2::2])
    folder = study_folder(setup, open_study(setup)) / "trial-000"  # where trial 0 will run
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("a run that is not this trial's")
    assert main(cli) == 1  # its only trial failed
    (trial,) = load(env, "squatted").trials
    assert trial.state == optuna.trial.TrialState.FAIL and "already holds a run" in trial.user_attrs["fail_reason"]
    assert (folder / "metrics.json").read_text() == "a run that is not this trial's"
    (child,) = one_to_one(load(env, "squatted"), client(env), "squatted")
    assert child.info.status == "FAILED"


def _start(env: dict[str, Path], name: str, out: Path, storage: str, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "dora_lab.study",
           *args(env, name, 1, f"output_dir={out}", f"study.storage={storage}", *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


STORES = [pytest.param("sqlite", id="sqlite"),
          pytest.param("postgres", id="postgres", marks=[pytest.mark.postgres, pytest.mark.skipif(
              not os.environ.get("DORA_LAB_TEST_POSTGRES"), reason="DORA_LAB_TEST_POSTGRES is not set "
              "(scripts/ci_postgres.sh starts a server and prints it)")])]


@pytest.mark.parametrize("store", STORES)
def test_identical_studies_started_together(env: dict[str, Path], store: str) -> None:
    """Four real processes at once on a fresh folder (so MLflow's store, and with SQLite Optuna's, is
    created by all of them together): two identical TPE studies and two identical grid studies."""
    out = env["root"] / f"together-{store}"
    tag = uuid.uuid4().hex[:6]
    storage = db_url(os.environ["DORA_LAB_TEST_POSTGRES"]) if store == "postgres" else f"sqlite:///{out / 'optuna.db'}"
    tpe, grid = f"tpe-{tag}", f"grid-{tag}"
    procs = [_start(env, tpe, out, storage, "study.n_trials=2"), _start(env, tpe, out, storage, "study.n_trials=2"),
             _start(env, grid, out, storage, *GRID4), _start(env, grid, out, storage, *GRID4)]
    try:
        outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
        for p, text in zip(procs, outputs, strict=True):
            assert p.returncode == 0, text
        c = client(env, f"sqlite:///{out / 'mlflow.db'}")
        # TPE: trial n draws with seed + n, so the two processes never train the same values
        study = optuna.load_study(study_name=tpe, storage=storage)
        assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4
        one_to_one(study, c, tpe)
        # grid: every point once, no duplicate (no PRUNED twin, no WAITING leftover), one MLflow run each
        study = optuna.load_study(study_name=grid, storage=storage)
        assert sorted(t.params["seed"] for t in study.trials) == [0, 1, 2, 3]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        one_to_one(study, c, grid)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if store == "postgres":
            for name in (tpe, grid):
                with contextlib.suppress(KeyError):
                    optuna.delete_study(study_name=name, storage=storage)


def _cli(env: dict[str, Path], name: str, *extra: str, n: int = 1, flags: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    # SIGINT back to its default in the child: under a shell that ignores it (a background job, as
    # with nohup ... &) the child would inherit SIG_IGN and Python would never raise KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "dora_lab.study", *args(env, name, n, *extra), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_training(env: dict[str, Path], name: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the trial has reported its first evaluation to Optuna: then it is inside the loop
    (a fixed sleep after start-up was flaky on a loaded machine: the run sometimes finished first)."""
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
        with contextlib.suppress(Exception):  # the storage or the study may not exist yet
            trials = load(env, name).trials
            if trials and trials[0].intermediate_values:
                return
        time.sleep(0.2)


def test_ctrl_c_fails_the_trial_and_stops_cleanly(env: dict[str, Path]) -> None:
    proc = _cli(env, "interrupted", "train.epochs=200")
    _wait_for_training(env, "interrupted", proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    assert "Run the same command again to continue" in out
    (trial,) = load(env, "interrupted").trials
    assert trial.state == optuna.trial.TrialState.FAIL and "KeyboardInterrupt" in trial.user_attrs["fail_reason"]
    parent, (child,) = runs(client(env), "interrupted")
    assert child.info.status == "KILLED" and "KeyboardInterrupt" in child.data.tags["fail_reason"]
    assert parent.info.status == "KILLED"


def test_sigterm_fails_the_trial_and_stops_cleanly(env: dict[str, Path]) -> None:
    """SIGTERM (timeout, Slurm, Kubernetes) as Ctrl-C: trial FAIL with reason terminated in Optuna and
    MLflow, both runs closed, the summary written, exit 143 with one line (issue 28)."""
    proc = _cli(env, "terminated", "train.epochs=200")
    _wait_for_training(env, "terminated", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, out
    assert "stopped: terminated (SIGTERM); finished trials are kept" in out and "Traceback" not in out
    (trial,) = load(env, "terminated").trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["fail_reason"] == "terminated (SIGTERM)"
    parent, (child,) = runs(client(env), "terminated")
    assert child.info.status == "KILLED" and child.data.tags["fail_reason"] == "terminated (SIGTERM)"
    assert parent.info.status == "KILLED"
    assert (Path(trial.user_attrs["run_dir"]).parent / "summary" / "trials.csv").is_file()


def test_sigterm_stops_every_worker(env: dict[str, Path]) -> None:
    """``--workers 2`` and SIGTERM to the study: both workers stop (no orphan goes on to the other
    trials), their running trials FAIL with reason terminated, exit 143."""
    proc = _cli(env, "terminated-workers", "train.epochs=200", n=6, flags=("--workers", "2"))
    deadline = time.time() + 240
    while True:  # until both workers are training
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
        with contextlib.suppress(Exception):
            if sum(bool(t.intermediate_values) for t in load(env, "terminated-workers").trials) == 2:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 143, out
    trials = load(env, "terminated-workers").trials
    assert len(trials) == 2 and all(t.user_attrs["fail_reason"] == "terminated (SIGTERM)" for t in trials), out
    assert all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    parent, children = runs(client(env), "terminated-workers")
    # every run closed: KILLED, or FAILED when the signal landed inside one of MLflow's own calls (seen once in a
    # quiet fresh-clone run; the trial's reason is still "terminated" above); never left RUNNING
    assert parent.info.status == "KILLED" and all(c.info.status in ("KILLED", "FAILED") for c in children), out
    for child in children:  # the worker processes are gone
        pid = int(child.data.tags["dora_lab.worker"].rsplit(":", 1)[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_killed_workers_trial_goes_stale_and_fails(env: dict[str, Path]) -> None:
    beat = ("study.heartbeat_interval=1", "study.grace_period=2")
    proc = _cli(env, "killed", "train.epochs=200", *beat)
    _wait_for_training(env, "killed", proc)
    proc.kill()
    proc.communicate()
    assert load(env, "killed").trials[0].state == optuna.trial.TrialState.RUNNING
    time.sleep(2.5)
    assert main(args(env, "killed", 1, *beat)) == 0  # resuming fails the stale trial, then runs one
    first, second = load(env, "killed").trials
    assert first.state == optuna.trial.TrialState.FAIL and second.state == optuna.trial.TrialState.COMPLETE
    assert "heartbeat" in first.user_attrs["fail_reason"]  # in Optuna too, as in MLflow (issue 28)
    _, children = runs(client(env), "killed")
    assert children[0].info.status == "FAILED" and "heartbeat" in children[0].data.tags["fail_reason"]


@pytest.fixture(scope="module")
def mlflow_server(env: dict[str, Path]) -> Iterator[str]:
    """A real ``mlflow server``; its backend is the shared SQLite store, its artifacts a folder of its own."""
    with serve_mlflow(f"sqlite:///{env['out'] / 'mlflow.db'}", env["root"] / "served-artifacts") as uri:
        yield uri


def test_mlflow_server_serves_the_study(env: dict[str, Path], mlflow_server: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(env, "served", 1, f"study.tracking_uri={mlflow_server}")) == 0
    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = get(f"{api}/experiments/get-by-name?experiment_name=served")["experiment"]
    # a model-training experiment, and the printed link (at the start and at the end) opens its runs
    # table in the model-training view, not MLflow 3's GenAI overview
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    tags = {t["key"]: t["value"] for t in exp["tags"]}
    (view,) = [k.removeprefix("mlflow.sharedViewState.") for k in tags if k.startswith("mlflow.sharedViewState.")]
    assert "params.`adapter.r0`" in json.loads(tags[f"mlflow.sharedViewState.{view}"])["selectedColumns"]
    link = f"{mlflow_server}/#/experiments/{exp['experiment_id']}/runs?workflowType=machine_learning" \
        f"&viewStateShareKey={view}\n"
    assert capsys.readouterr().out.count(f"MLflow runs of this study: {link}") == 2
    with urllib.request.urlopen(link, timeout=30) as page:  # the UI's page (the part after # is the browser's)
        assert page.status == 200 and b"<div id=\"root\"" in page.read()
    found = post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in found]
    parent = [r for r, t in zip(found, tags, strict=True) if t["dora_lab.role"] == "study"]
    child = [(r, t) for r, t in zip(found, tags, strict=True) if t["dora_lab.role"] == "trial"]
    assert len(parent) == 1 and len(child) == 1
    run, ctags = child[0]
    assert ctags["mlflow.parentRunId"] == parent[0]["info"]["run_id"] and run["info"]["status"] == "FINISHED"
    query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "metric_key": "train/loss"})
    history = get(f"{api}/metrics/get-history?{query}")["metrics"]
    assert sorted(int(m["step"]) for m in history) == list(range(1, STEPS + 1))
    assert any(p["key"] == "train.lr" for p in run["data"]["params"])
    # the train and evaluation rows as MLflow datasets: named by task and split, the data folder as source,
    # MLflow's digest of the very rows the trial used (its seed's subset of 64)
    inputs = get(f"{api}/runs/get?run_id={run['info']['run_id']}")["run"]["inputs"]["dataset_inputs"]
    logged = {i["dataset"]["name"]: i for i in inputs}
    assert sorted(logged) == ["cola/train", "cola/validation"]
    seed = int(ctags["seed"])
    for split, context in (("train", "train"), ("validation", "eval")):
        ds = logged[f"cola/{split}"]
        assert {t["key"]: t["value"] for t in ds["tags"]} == {"mlflow.data.context": context}
        assert ds["dataset"]["source_type"] == "local"
        assert json.loads(ds["dataset"]["source"]) == {"uri": str(Path(COLA).resolve())}
        assert json.loads(ds["dataset"]["profile"])["num_rows"] == 64
        rows = {s: load_splits(get_task("cola"), COLA, max_train_samples=64, max_eval_samples=64, seed=s)[split]
                for s in (seed, seed + 1)}
        digest = {s: mlflow.data.from_pandas(pandas.DataFrame(r), targets="label").digest for s, r in rows.items()}
        assert ds["dataset"]["digest"] == digest[seed] != digest[seed + 1]
    arts = get(f"{api}/artifacts/list?" + urllib.parse.urlencode({"run_id": run["info"]["run_id"]}))
    assert {"rank_heatmap.png", "budget.png", "adapter"} <= {f["path"] for f in arts["files"]}
    # the adapter is logged, so export by run id works where the trial's folder is not
    run_dir = Path(ctags["dora_lab.run_dir"])
    assert export_main([str(run_dir), "--to", "peft", str(env["root"] / "peft-from-folder")]) == 0
    shutil.rmtree(run_dir)
    assert export_main([run["info"]["run_id"], "--to", "peft", str(env["root"] / "peft-from-mlflow"),
                        "--tracking-uri", mlflow_server]) == 0
    for f in sorted((env["root"] / "peft-from-folder").iterdir()):
        assert (env["root"] / "peft-from-mlflow" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("DORA_LAB_TEST_POSTGRES"),
                    reason="DORA_LAB_TEST_POSTGRES is not set (scripts/ci_postgres.sh starts a server and prints it)")
def test_postgres_storage_two_workers(env: dict[str, Path]) -> None:
    url = db_url(os.environ["DORA_LAB_TEST_POSTGRES"])
    name = f"pg-{uuid.uuid4().hex[:8]}"
    try:
        assert main([*args(env, name, 2, f"study.storage={url}"), "--workers", "2"]) == 0
        study = load(env, name, storage=url)
        assert sorted(t.number for t in study.trials) == [0, 1]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        _, children = runs(client(env), name)
        assert len({r.data.tags["dora_lab.worker"] for r in children}) == 2
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_a_studys_trials_tokenise_once(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two trials: the first tokenises train and validation into <study folder>/cache, the second reads them."""
    from dora_lab.run import token_cache

    calls: list[str] = []
    real = token_cache.encode_rows
    monkeypatch.setattr(token_cache, "encode_rows", lambda rows, spec, tok, **kw: calls.append(spec.name) or
                        real(rows, spec, tok, **kw))
    assert main(args(env, "cached", 2)) == 0
    study = load(env, "cached")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert calls == ["cola", "cola"]  # train and validation, once for both trials
    cache = Path(study.trials[0].user_attrs["run_dir"]).parent / "cache"
    assert [p.name.startswith("tokens-cola-") for p in cache.iterdir()] == [True]


def test_workers_auto_runs_one_trial_in_this_process(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args(env, "auto", 1), "--workers", "auto"]) == 0
    assert "--workers auto: 1 worker(s)" in capsys.readouterr().out  # capped at the one trial to run
    assert [t.state for t in load(env, "auto").trials] == [optuna.trial.TrialState.COMPLETE]
