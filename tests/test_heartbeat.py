"""A trial's heartbeat on a busy store, and a trial another worker took over (dora_lab.study.grid):
a beat that fails is retried and two failures in a row are one warning a trial; a trial marked
FAIL as stale by a second process while it ran is discarded with a warning, and the runner goes on
(Optuna refuses to tell a FAIL trial: the worker crashed).  Real SQLite storages, no training."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import optuna
import pytest

from dora_lab.plan.setup import StudySetup, prepare
from dora_lab.study.grid import heartbeat
from dora_lab.study.runner import _run_trials, open_study
from dora_lab.study.trial import OpenRuns
from dora_lab.track.tracker import STALE_REASON

REPO = Path(__file__).resolve().parents[1]
COLA = REPO / "configs" / "cola.yaml"
DISCARDED = "its result was discarded: another worker marked it stale"
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning")  # ask() outside optimize()


def _grid_setup(tmp_path: Path) -> StudySetup:
    return prepare(COLA, [f"output_dir={tmp_path}", "study.sampler=grid", "study.n_trials=null",
                          "study.space={seed: {type: categorical, choices: [0, 1]}}"])


def _mark_stale_elsewhere(setup: StudySetup, trial: optuna.Trial) -> None:
    """What :func:`~dora_lab.study.grid.fail_stale` does in another worker: a second Study object on the
    same storage sets the stale reason and FAIL."""
    other = optuna.load_study(study_name=setup.name, storage=setup.storage)
    frozen = next(t for t in other.get_trials(deepcopy=False) if t.number == trial.number)
    other._storage.set_trial_user_attr(frozen._trial_id, "fail_reason", STALE_REASON)
    assert other._storage.set_trial_state_values(frozen._trial_id, state=optuna.trial.TrialState.FAIL)


@pytest.mark.parametrize("after", ["returns", "writes"])
def test_a_trial_taken_over_by_another_worker_is_discarded_and_the_study_goes_on(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], after: str) -> None:
    """``returns``: the stale mark lands after the trial's last write, its value is told; ``writes``: the
    trial writes again (a user attr, as the real objective does), which Optuna refuses."""
    setup = _grid_setup(tmp_path)
    study = open_study(setup)
    calls: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        seed = trial.suggest_categorical("seed", [0, 1])
        calls.append(trial.number)
        if trial.number == 0:
            _mark_stale_elsewhere(setup, trial)
            if after == "writes":
                trial.set_user_attr("best_step", 3)
        return 0.5 + seed

    capfd.readouterr()
    _run_trials(setup, study, objective, 3, OpenRuns())  # old code: ValueError "Cannot tell a FAIL trial"
    err = capfd.readouterr().err
    assert err.count(DISCARDED) == 1 and "warning: trial 0:" in err, err
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"] == STALE_REASON and trials[0].value is None
    assert trials[1].params == {"seed": 0} and trials[1].user_attrs.get("retry_of") == 0  # its point ran again
    assert trials[2].params == {"seed": 1} and calls == [0, 1, 2]


def test_a_trial_gone_stale_before_its_tell_ends_fail_in_optuna_and_mlflow_alike(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A real tiny trial through :func:`~dora_lab.study.runner.optimize` (SQLite Optuna storage, SQLite
    MLflow store): its heartbeat goes stale after its last write (one beat at its start, every 60 s;
    grace 1 s), and before its tell another worker starts (:func:`open_study`: ``fail_stale`` marks it
    FAIL, its callback closes the MLflow run).  Old code ended the MLflow run FINISHED before the tell,
    so it stayed FINISHED (``state`` COMPLETE, an ``objective``) beside Optuna's FAIL."""
    from mlflow import MlflowClient

    from dora_lab.study import runner
    from dora_lab.track.logger import STALE_TAG
    from tests.tiny import make_tiny_model_dir, one_thread, tiny_overrides

    tiny = tiny_overrides(make_tiny_model_dir(tmp_path / "tiny"), tmp_path, train=32, evals=32)
    setup = prepare(COLA, [*tiny, "train.epochs=1", "study.sampler=grid", "study.n_trials=1",
                           "study.space={seed: {type: categorical, choices: [0]}}",
                           "study.heartbeat_interval=60", "study.grace_period=1"])
    told = runner.tell

    def paused_tell(study: optuna.Study, trial: optuna.Trial, *args: object, **kwargs: object) -> object:
        time.sleep(1.5)  # a paused machine: the trial's one beat is older than the grace period now
        runner.open_study(setup, runner._tracker(setup))  # another worker starts and fails it as stale
        return told(study, trial, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "tell", paused_tell)
    capfd.readouterr()
    with one_thread():
        runner.optimize(setup, 1)
    assert capfd.readouterr().err.count(DISCARDED) == 1
    (trial,) = optuna.load_study(study_name=setup.name, storage=setup.storage).trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["fail_reason"] == STALE_REASON
    run = MlflowClient(setup.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"])
    tags = run.data.tags
    assert run.info.status == "FAILED" and tags["state"] == "FAIL", (run.info.status, tags.get("state"))
    assert tags["fail_reason"] == STALE_REASON and tags[STALE_TAG] == "true"
    assert run.data.metrics and "objective" not in run.data.metrics  # it trained; its value is discarded


def test_a_fail_of_another_kind_still_raises(tmp_path: Path) -> None:
    """Only a stale mark is forgiven: telling a trial this process already finished stays an error."""
    from dora_lab.study.grid import tell

    setup = _grid_setup(tmp_path)
    study = open_study(setup)
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):
        tell(study, trial, 0.5)


def test_failed_heartbeats_are_retried_and_said_once_after_two_in_a_row(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A real "database is locked": another connection holds SQLite's write lock for four beats; the
    storage waits 0.1 s for it.  The beats after the lock is let go succeed (the heartbeat is fresh)."""
    db = tmp_path / "optuna.db"
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 0.1}},
                                             heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(storage=storage, study_name="beats")
    trial = study.ask()
    capfd.readouterr()
    blocker = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with heartbeat(trial):
            time.sleep(4.5)  # beats at 0, 1, 2, 3, 4 s: all refused
            blocker.execute("COMMIT")
            before = time.time()
            time.sleep(2.5)  # the next beats go through
        beat = storage._get_stale_trial_ids(study._study_id)  # none stale: a beat landed after the lock
    finally:
        blocker.close()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, err
    assert "warning: trial 0: its heartbeat failed twice in a row (" in lines[0] and "database is locked" in lines[0]
    assert beat == []
    assert _last_beat(db) >= before - 0.01  # retried, not given up


def _last_beat(db: Path) -> float:
    """The trial's recorded heartbeat time (Optuna's trial_heartbeats table), as a UNIX time."""
    from datetime import UTC, datetime

    with sqlite3.connect(db) as conn:
        (stamp,) = conn.execute("SELECT heartbeat FROM trial_heartbeats").fetchone()
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()
