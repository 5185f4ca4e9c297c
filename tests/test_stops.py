"""Signals and damaged stores (issue 28): SIGTERM stops training cleanly; a damaged or full store is
one ``error:`` naming it and the fix, never a traceback; an adapter that cannot be written leaves
nothing half-written.  (The study's SIGTERM cases, one process and ``--workers 2``, are in
tests/test_study.py next to Ctrl-C's.)

Everything for real: subprocesses and ``os.kill``, SQLite files overwritten with garbage or cut in
half, a file-size limit (``RLIMIT_FSIZE``) in the child, and a small tmpfs filled up (as root).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from dora_lab.report.compare import main as report_main
from dora_lab.studies import main as study_main
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides

pytestmark = pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
COLA_YAML = str(REPO / "configs" / "cola.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "bert")


def _study_args(tiny_dir: Path, out: Path, *extra: str, storage: Path | None = None) -> list[str]:
    """A one-trial study of the tiny BERT (``extra``: more ``--set``s), both stores named."""
    sets = [*[s for s in tiny_overrides(tiny_dir, out, train=64, evals=64) if not s.startswith("schedule.interval=")],
            "train.eval_every=4", "study.name=stops", "study.n_trials=1",
            f"study.storage=sqlite:///{storage or out / 'optuna.db'}", f"study.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            *extra]
    return [COLA_YAML, *[x for s in sets for x in ("--set", s)]]


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a SQLite database\n" * 700)
    return path


# -- SIGTERM during training ---------------------------------------------------------------------
def _sigterm_training(tiny_dir: Path, tmp_path: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    """``python -m dora_lab.train`` (a long run of the tiny BERT, ``extra`` more ``--set``s), SIGTERM
    once it trains (its config.yaml is written); (exit code, stderr) as soon as it exits (its output
    goes to a file: a pipe would also wait for any child process that outlives it)."""
    sets = [*tiny_overrides(tiny_dir, tmp_path / "out", train=64, evals=16), "train.epochs=500", *extra]
    log = tmp_path / f"{run_dir.name}.stderr"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dora_lab.train", COLA_YAML,
                                 *[x for s in sets for x in ("--set", s)], "--run-dir", str(run_dir)],
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=ENV)
        deadline = time.time() + 180
        while not (run_dir / "config.yaml").is_file():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    return code, log.read_text()


def test_train_stops_on_sigterm_with_exit_143(tiny_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, err = _sigterm_training(tiny_dir, tmp_path, run_dir)
    assert code == 143, err
    assert "Traceback" not in err
    assert "error: the run failed during training: terminated (SIGTERM)" in err
    assert f"The run folder {run_dir} keeps config.yaml" in err


def _processes_naming(text: str) -> list[int]:
    """The pids of this machine's processes whose command line contains ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


def test_train_with_two_processes_stops_every_rank_on_sigterm(tiny_dir: Path, tmp_path: Path) -> None:
    """``train.processes: 2`` relaunches under torchrun: SIGTERM to the command reaches torchrun and
    its ranks (before: the command died at once and the ranks trained on as orphans)."""
    run_dir = tmp_path / "run2"
    code, err = _sigterm_training(tiny_dir, tmp_path, run_dir, "train.processes=2")
    deadline = time.time() + 30
    while _processes_naming(str(run_dir)) and time.time() < deadline:  # torchrun and both ranks end
        time.sleep(0.5)
    left = _processes_naming(str(run_dir))
    for pid in left:  # this test's processes only: their command line names its run folder
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == []
    assert code == 143, err
    assert "terminated (SIGTERM)" in err


# -- damaged stores ------------------------------------------------------------------------------
def test_a_damaged_optuna_db_is_refused_naming_it(tiny_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    db = _garbage(out / "optuna.db")
    assert study_main(_study_args(tiny_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"error: the Optuna store sqlite:///{db} (study.storage) cannot be used: {db} is damaged" in err
    assert "restore it from a backup, or set study.storage to a new database" in err
    assert "Nothing was started or stored." in err
    assert not (out / "mlflow.db").exists()  # refused before either store was opened


def test_a_truncated_mlflow_db_is_refused_naming_it(tiny_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    db = out / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("made-before")  # a real store, then cut in half
    os.truncate(db, db.stat().st_size // 2)
    assert study_main(_study_args(tiny_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"error: the MLflow store sqlite:///{db} (study.tracking_uri) cannot be used: {db} is damaged" in err
    assert "set study.tracking_uri to a new database" in err
    assert not (out / "optuna.db").exists()


def test_report_on_a_damaged_optuna_db_names_it(tiny_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    db = _garbage(out / "optuna.db")
    assert report_main([COLA_YAML, "--set", f"output_dir={out}", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert f"error: the Optuna store sqlite:///{db} (study.storage) cannot be used: {db} is damaged" in err


# -- full disks ----------------------------------------------------------------------------------
def test_an_adapter_that_cannot_be_written_leaves_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    """A 12 kB file-size limit: every run file fits, the 18 kB adapter weights do not."""
    run_dir = tmp_path / "run"
    sets = [*tiny_overrides(tiny_dir, tmp_path / "out", train=32, evals=16), "train.max_steps=4",
            "train.eval_every=2", "schedule.warmup=1", "schedule.final=1", "schedule.interval=1"]
    limit = 12_000
    proc = subprocess.run([sys.executable, "-m", "dora_lab.train", COLA_YAML, *[x for s in sets for x in ("--set", s)],
                           "--run-dir", str(run_dir)], capture_output=True, text=True, env=ENV, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the adapter was NOT saved to {run_dir / 'adapter'}: File too large" in proc.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == ["allocation.json", "budget.json", "config.yaml",
                                                          "metrics.json", "scores.json"]  # no adapter/, no .tmp


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (as root; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), (folder / f"filler-{uuid.uuid4().hex}").open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


@pytest.mark.parametrize("store", ["optuna", "mlflow"])
def test_a_full_disk_during_a_study_is_one_error(tiny_dir: Path, tmp_path: Path, small_disk: Path, store: str) -> None:
    """The store's database on a tmpfs that fills up while trial 0 trains: one error naming that
    store, exit 1 (before: StorageInternalError's traceback, trial and runs left RUNNING).  Optuna's
    full: the MLflow runs are closed FAILED.  MLflow's full: the trial is FAIL in Optuna."""
    out = tmp_path / "out"
    optuna_db = small_disk / "optuna.db" if store == "optuna" else out / "optuna.db"
    mlflow_db = small_disk / "mlflow.db" if store == "mlflow" else out / "mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "dora_lab.study",
                             *_study_args(tiny_dir, out, "train.epochs=200", f"study.tracking_uri=sqlite:///{mlflow_db}",
                                          storage=optuna_db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 180
    # until trial 0 trains (its folder's config.yaml; polling a store from here could race its creation)
    while not list((out / "studies" / "stops").glob("*/trial-000/config.yaml")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(2.0)
    _fill(small_disk)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "Exception in thread" not in err
    name, key, db = ("Optuna", "study.storage", optuna_db) if store == "optuna" else ("MLflow", "study.tracking_uri", mlflow_db)
    assert f"error: the {name} store sqlite:///{db} ({key}) cannot be used: " in err
    assert "If its disk is full, free space and run the same command again" in err
    for filler in small_disk.glob("filler-*"):
        filler.unlink()
    if store == "optuna":
        c = MlflowClient(f"sqlite:///{mlflow_db}")
        found = c.search_runs([c.get_experiment_by_name("stops").experiment_id])
        assert sorted(r.data.tags["dora_lab.role"] for r in found) == ["study", "trial"]
        assert all(r.info.status == "FAILED" and r.data.tags["fail_reason"] for r in found)
    else:
        (trial,) = optuna.load_study(study_name="stops", storage=f"sqlite:///{optuna_db}").trials
        assert trial.state == optuna.trial.TrialState.FAIL and "full" in trial.user_attrs["fail_reason"]


# -- a stop never lands inside a call into a store -----------------------------------------------
# A KeyboardInterrupt raised between two lines of SQLAlchemy (mid-commit, mid-return of a connection
# to its pool) can leave a connection with its write transaction open; SQLite then answers the
# clean-up's next write "database is locked" (seen once as an exit 1 instead of 143 in
# test_sigterm_fails_the_trial_and_stops_cleanly).  The stop waits for the store call to end instead.
def _stop_on_insert(engine: object, table: str) -> list[int]:
    """SIGTERM to this process right after the first INSERT into ``table`` on ``engine`` runs (before
    its commit): a signal arriving in the middle of a store's write.  The list counts the firings."""
    from sqlalchemy import event

    fired: list[int] = []

    def fire(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()}") and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    event.listen(engine, "after_cursor_execute", fire)
    return fired


def test_a_stop_waits_for_the_end_of_a_deferred_block_then_is_raised() -> None:
    from dora_lab.run.cli import Terminated, deferred_stop, stop_on_signals

    ran = []
    with stop_on_signals():
        with pytest.raises(Terminated), deferred_stop():
            with deferred_stop():  # nested: raised when the outermost block ends
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                ran.append("inner")
            time.sleep(0.2)
            ran.append("outer")
        assert ran == ["inner", "outer"]
        with pytest.raises(KeyboardInterrupt) as ctrl_c, deferred_stop():  # Ctrl-C waits too, stays a Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            ran.append("ctrl-c")
        assert ran[-1] == "ctrl-c" and not isinstance(ctrl_c.value, Terminated)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):  # outside a block: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert time.monotonic() - started < 2


def test_a_sigterm_in_the_middle_of_an_mlflow_write_lands_after_it(tmp_path: Path) -> None:
    """The study's MLflow client (StudyTracker.client) on a real SQLite store: a SIGTERM that arrives
    between a metric's INSERT and its commit is raised when the call returns; the metric is stored
    and the next write (the run's end, as the clean-up writes it) goes through at once."""
    from dora_lab.run.cli import Terminated, stop_on_signals
    from dora_lab.track.tracker import StudyTracker

    client = StudyTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "stops", "stops").client
    assert isinstance(client, MlflowClient)
    run_id = client.create_run(client.get_experiment_by_name("stops").experiment_id).info.run_id
    fired = _stop_on_insert(client._tracking_client.store.engine, "metrics")
    with stop_on_signals():
        with pytest.raises(Terminated):
            client.log_metric(run_id, "eval_mcc", 0.25, step=3)
        started = time.monotonic()
        client.set_terminated(run_id, "KILLED")
    assert fired and time.monotonic() - started < 5
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval_mcc")] == [(3, 0.25)]
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_sigterm_in_the_middle_of_an_optuna_write_lands_after_it(tmp_path: Path) -> None:
    """The same for the study's Optuna storage (the RDBStorage open_study makes): the trial's report
    is stored, the stop is raised after it, and the fail reason the clean-up writes next goes in."""
    from dora_lab.run.cli import Terminated, stop_on_signals, stop_safe

    storage = stop_safe(optuna.storages.RDBStorage)(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert isinstance(storage, optuna.storages.RDBStorage)
    study = optuna.create_study(storage=storage, study_name="stops")
    trial = study.ask()
    fired = _stop_on_insert(storage.engine, "trial_intermediate_values")
    with stop_on_signals():
        with pytest.raises(Terminated):
            trial.report(0.25, step=3)
        trial.set_user_attr("fail_reason", "terminated (SIGTERM)")
    (kept,) = optuna.load_study(study_name="stops", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert fired and kept.intermediate_values == {3: 0.25}
    assert kept.user_attrs["fail_reason"] == "terminated (SIGTERM)"


def test_every_mlflow_client_dora_lab_makes_holds_a_stop_off_its_calls() -> None:
    """dora_lab makes its MLflow clients as track.tracker.StoreClient (stop_safe), never MlflowClient
    itself: a new plain client would bring back the locked store above."""
    from dora_lab.track.tracker import StoreClient

    assert issubclass(StoreClient, MlflowClient) and StoreClient is not MlflowClient
    plain = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "dora_lab").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "MlflowClient(" in line and "stop_safe(MlflowClient)" not in line]
    assert plain == [], f"a plain MLflow client (make it StoreClient): {plain}"


_STRESS = """
import contextlib, random, signal, sqlite3, sys
from mlflow import MlflowClient
from dora_lab.run.cli import _stop, stop_safe

db = sys.argv[1]
client = stop_safe(MlflowClient)("sqlite:///" + db)
experiment = client.create_experiment("stops")
signal.signal(signal.SIGALRM, lambda signum, frame: _stop(KeyboardInterrupt()))  # as Ctrl-C arrives
rng = random.Random(0)
for stop in range(200):
    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0005, 0.05))
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            run_id = client.create_run(experiment).info.run_id
            for step in range(3):
                client.log_metric(run_id, "loss", float(step), step=step)
            client.set_terminated(run_id)
    signal.setitimer(signal.ITIMER_REAL, 0)
    other = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # "database is locked" if a write was left open
        other.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        sys.exit(f"the store was left locked after stop {stop + 1}: {exc}")
    other.close()
print("200 stops, the store never locked")
"""


def test_stops_at_random_moments_of_mlflow_writes_never_leave_the_store_locked(tmp_path: Path) -> None:
    """200 Ctrl-Cs at random moments (0.5-50 ms) while runs are created, logged and ended on a real
    SQLite store, in a child process: after each, another connection takes the write lock at once.
    With MLflow's plain client the store was found locked after 17, 33 and 89 stops in three tries,
    and a fourth hung until killed."""
    try:
        done = subprocess.run([sys.executable, "-c", _STRESS, str(tmp_path / "mlflow.db")], env=ENV,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the stress run hung: a stop left the store (or its connection pool) stuck")
    assert done.returncode == 0 and "never locked" in done.stdout, done.stderr[-3000:]
