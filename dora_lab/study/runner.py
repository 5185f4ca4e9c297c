"""Optuna studies over run configs, tracked in MLflow:
``python -m dora_lab.study CONFIG [--set key=value ...] [--workers N]``.

The config's ``study:`` block (:mod:`dora_lab.plan`, read by :func:`prepare`; its Optuna
sampler and pruner from :mod:`dora_lab.study.samplers`) says what to search and how; every
trial is one :func:`dora_lab.run.train.train_run` of the config with the trial's values set.

- Resuming: the same command again loads the same study (``load_if_exists``) from its storage and
  adds ``study.n_trials`` more trials; numbering continues, the MLflow parent run is found again by
  its tags.  A trial left RUNNING by a killed worker is marked FAIL once its heartbeat is older
  than ``study.grace_period`` (RDB storages).
- Identity: a new study's identity (creation time + random part, :func:`open_study`) matches its MLflow parent
  run and names its trial folders ``<output_dir>/studies/<name>/<identity>/trial-NNN``; a new study of an old
  name (``optuna.db`` deleted) never reuses the old parent or folders.
- Parallel: ``--workers N`` runs N worker processes (this CLI with ``--worker``) on one storage,
  this invocation's trials split between them.  Distributed: give ``study.storage`` a PostgreSQL
  URL and ``study.tracking_uri`` an MLflow server, and run the same command on every machine.
  Any number of processes may start the same study at once: stores are created under a lock, TPE
  and random seed trial n with ``seed + n`` (no two processes replay one draw), and a grid point is
  claimed (queued and asked for) under the storage's lock, so no point runs twice and every Optuna
  trial has exactly one MLflow run.
- Data-parallel trials: with ``train.processes: N`` each trial is a ``torchrun`` of N ranks
  (:func:`dora_lab.run.distributed.run_in_processes`) that this process follows live; ``--workers W``
  gives each worker its own N GPUs when the machine has W x N (else they share them).
- Failures: a trial that raises (including :class:`~dora_lab.run.loop.DivergenceError` and an invalid
  sampled config) is recorded FAIL with the reason (trial user attr ``fail_reason``, MLflow tag
  ``fail_reason``) and the study goes on; Ctrl-C (or SIGTERM) fails the running trial the same way
  and stops the study cleanly (exit 130, or 143) after writing the summary.  Before any trial the base config's data
  and model are loaded once (:func:`preflight`): a missing data folder or an unreachable Hub is one
  error (exit 2) that stores nothing.  A trial that still fails to load its data or model stops
  the study (every later trial would fail alike); a run whose trials all failed exits with 1.
- Stores (:mod:`dora_lab.track.stores`): a damaged SQLite ``optuna.db`` or ``mlflow.db`` is refused before
  any work (exit 2); a store that fails during the study (a full disk) stops it with one error that
  names the store, after closing the MLflow runs where MLflow still answers (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..plan.objectives import is_multi
from ..plan.setup import StudySetup, prepare
from ..run.cli import EXIT_FAILED, check_writable_folder, refuse, stop_code, stop_reason, stop_safe, stoppable
from ..run.config_yaml import ConfigError
from ..track.front import FRONT_TAG
from ..track.links import safe_url, ui_lines
from ..track.locks import store_lock
from ..track.stores import StoreError, check_sqlite_store, hide_store_tracebacks, store_failure, store_message
from ..track.tracker import STALE_REASON, UID_TAG, StudyTracker
from .grid import claim_grid_point, fail_stale, heartbeat, tell, trials_to_run
from .pacing import Paced
from .samplers import check_directions, check_space_unchanged, make_pruner, make_sampler
from .seeds import run_stages, use_plan
from .summary import print_summary
from .trial import ENVIRONMENT_ERRORS, OpenRuns, make_objective, preflight
from .workers import resolve_workers, run_workers, workers_arg

__all__ = ["Reporting", "main", "make_report", "optimize", "open_study", "run_study", "study_folder"]


# -- Optuna ---------------------------------------------------------------------------------------
def open_study(setup: StudySetup, tracker: StudyTracker | None = None) -> optuna.Study:
    """Create or load the study; RDB storages get a heartbeat so dead workers' trials go stale.

    Creating happens under the storage's lock (:func:`~dora_lab.track.locks.store_lock`): processes that
    start together on a fresh storage neither race through its tables nor give one study two
    identities.  A new study gets its identity (:data:`~dora_lab.track.tracker.UID_TAG`: creation time and
    a random part) as a user attr; its MLflow parent run and its trial folders are named for it, so a
    new study of an old name (its ``optuna.db`` deleted) never takes over the old one's."""
    s = setup.study
    storage: Any = setup.storage
    with store_lock(setup.storage):
        if "://" in storage and not storage.startswith(("redis", "grpc")):
            def stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if tracker is not None:
                    tracker.mark_failed(trial.user_attrs.get("mlflow_run_id"), STALE_REASON)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = stop_safe(optuna.storages.RDBStorage)(  # a stop waits out a store call
                    storage, engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {},
                    heartbeat_interval=s.heartbeat_interval, grace_period=s.grace_period,
                    heartbeat_stale_trial_callback=stale if s.heartbeat_interval else None)
        directions = [optuna.study.StudyDirection[d.upper()] for _, d in setup.goals]
        study = optuna.create_study(storage=storage, study_name=setup.name, directions=directions,
                                    sampler=make_sampler(s), pruner=make_pruner(s), load_if_exists=True)
        check_directions(setup.goals, study)
        if UID_TAG not in study.user_attrs:  # new (or made by a dora_lab from before identities)
            study.set_user_attr(UID_TAG, f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}")
            if is_multi(setup.goals):  # the objectives' names, for reports and Optuna's own tools
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names([m for m, _ in setup.goals])
    fail_stale(study)
    return study


def study_uid(study: optuna.Study) -> str:
    """The study's identity, set by :func:`open_study`."""
    return str(study.user_attrs[UID_TAG])


def study_folder(setup: StudySetup, study: optuna.Study) -> Path:
    """``<output_dir>/studies/<name>/<identity>``: this study's trial folders and summary."""
    return setup.study_dir / study_uid(study)


def _run_trials(setup: StudySetup, study: optuna.Study, objective: Callable[[optuna.Trial], float | list[float]],
                n_trials: int | None, runs: OpenRuns, after: Callable[[], None] = lambda: None) -> None:
    """Ask, run and tell up to ``n_trials`` trials (``None``: no limit) until ``study.timeout`` (a grid: or
    no point left); a failed trial is FAIL and the next runs, except after a data or model error; Ctrl-C
    records FAIL and stops.  Optuna is told first, then ``runs`` ends the MLflow run as Optuna kept it."""
    started, ran = time.monotonic(), 0
    while n_trials is None or ran < n_trials:
        if setup.study.timeout is not None and time.monotonic() - started >= setup.study.timeout:
            return
        fail_stale(study)
        with warnings.catch_warnings():  # Optuna's note that heartbeats come with optimize(): heartbeat() beats
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = claim_grid_point(setup.study, study, setup.storage) if setup.study.sampler.name == "grid" else study.ask()
        if trial is None:
            return
        ran += 1
        with heartbeat(trial):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                runs.close(trial, tell(study, trial, state=optuna.trial.TrialState.PRUNED))
            except KeyboardInterrupt:
                runs.close(trial, tell(study, trial, state=optuna.trial.TrialState.FAIL))
                raise
            except Exception as exc:
                runs.close(trial, tell(study, trial, state=optuna.trial.TrialState.FAIL))
                if store_failure(exc):  # a full or damaged store: every next trial would fail too
                    raise
                if isinstance(exc, ENVIRONMENT_ERRORS):
                    return
            else:
                runs.close(trial, tell(study, trial, value))
        after()


def optimize(setup: StudySetup, n_trials: int | None, parent_id: str | None = None, progress: bool = False,
             tracker: StudyTracker | None = None, study: optuna.Study | None = None,
             reporting: Reporting | None = None) -> None:
    """Run ``n_trials`` trials in this process (``None``: until ``study.timeout``, or a grid's end)."""
    tracker = tracker or _tracker(setup)
    study = study or open_study(setup, tracker)
    use_plan(setup.study, study)  # study.seeds: the seeds its grid holds now (a worker reads the plan here)
    parent_id = parent_id or tracker.parent_run(study_uid(study), _parent_tags(setup), _parent_params(setup))
    tracker.parent_id = parent_id
    if not tracker.factors:  # a worker process: its trials get their group's colour too
        tracker.factors, tracker.groups = _groups(setup)
    if n_trials is None or n_trials > 0:
        folder, runs = study_folder(setup, study), OpenRuns()  # runs: each trial's MLflow run, ended after its tell
        _run_trials(setup, study, make_objective(setup, folder, tracker, parent_id, runs, progress), n_trials, runs,
                    after=Paced(lambda: post_answer(setup, tracker, study, reporting)))  # the end posts it too


def _groups(setup: StudySetup) -> tuple[list[str], list[tuple[str, ...]]]:
    """The study's factors (``report.factors`` where they are searched params, else every searched key
    but ``seed``) and, where all are categorical, their groups in grid order (their colours)."""
    space = setup.study.space
    named = [k for k in (setup.data.get("report") or {}).get("factors") or [] if k in space]
    factors = named or [k for k in space if k != "seed"]
    grid = setup.study.grid()
    if not all(k in grid for k in factors):
        return factors, []
    return factors, [tuple(map(str, g)) for g in itertools.product(*(grid[k] for k in factors))]


@dataclass(frozen=True)
class Reporting:
    """What the study does with the report, handed in by the study command (:mod:`dora_lab.studies`),
    since the runner does not import the report (they stand side by side): ``answer(setup, tracker,
    summary_folder)`` posts the answer so far to MLflow after every trial and at the end;
    ``report(setup)`` makes the report of a config's ``report:`` block at the end (its exit code, or
    None without a block).  Without one (``None``) a study posts no answer and makes no report."""

    answer: Callable[[StudySetup, StudyTracker, Path], None]
    report: Callable[[StudySetup], int | None]


def post_answer(setup: StudySetup, tracker: StudyTracker, study: optuna.Study, reporting: Reporting | None) -> None:
    """Post the answer so far to the parent run's and the experiment's descriptions, and every
    trial's allocation side by side (``reporting.answer``: :func:`dora_lab.report.study_end.answer`).
    A failure is a note on stderr: the answer in MLflow must never stop a study."""
    if reporting is None or tracker.parent_id is None:
        return
    try:
        reporting.answer(setup, tracker, study_folder(setup, study) / "summary")
    except Exception as exc:
        print(f"note: the answer in MLflow's description was not updated: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def _tracker(setup: StudySetup) -> StudyTracker:
    return StudyTracker(setup.tracking_uri, setup.study.experiment or setup.name, setup.name,
                        artifact_root=setup.output_dir / "mlartifacts")


def _parent_tags(setup: StudySetup) -> dict[str, str]:
    s = setup.study
    return {"config": str(setup.config_path), "optuna.storage": safe_url(setup.storage),
            "optuna.sampler": s.sampler.name, "optuna.pruner": s.pruner.name,
            "dora_lab.space": ", ".join(s.space) or "(none)", "task": setup.base.task.name,
            "model": setup.base.model.name, "mlflow.note.content": f"Optuna study {setup.name!r} "
            f"({', '.join(f'{d} {m}' for m, d in setup.goals)}); one child run per trial."}


def _parent_params(setup: StudySetup) -> dict[str, str]:
    """The study's settings as the parent run's params: the base config, the sampler, the pruner
    and their settings, the trial count, the timeout, and each searched key's range as JSON."""
    s = setup.study
    params = {"study.config": str(setup.config_path.resolve()), "study.overrides": json.dumps(setup.overrides),
              "study.metric": setup.metric, "study.direction": s.direction, "study.objective": s.objective,
              "study.n_trials": str(s.n_trials), "study.timeout": str(s.timeout)}
    if is_multi(setup.goals):
        params["study.objectives"] = json.dumps([{"metric": m, "direction": d} for m, d in setup.goals])
    for part in ("sampler", "pruner"):
        params |= {f"study.{part}" + (f".{k}" if k != "name" else ""): str(v)
                   for k, v in getattr(s, part).model_dump(mode="json").items()}
    params |= {f"study.space.{k}": json.dumps(p.model_dump(mode="json", exclude_none=True))
               for k, p in s.space.items()}
    return params


# -- the whole study ------------------------------------------------------------------------------
def run_study(setup: StudySetup, workers: int | str = 1, reporting: Reporting | None = None) -> int:
    """The CLI's main path: open the study and its parent run, run the trials, summarize.
    ``workers``: a count, or ``"auto"`` (:func:`~dora_lab.study.workers.resolve_workers`);
    ``reporting``: the answer and the report (:class:`Reporting`; the study command's)."""
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be a whole number of at least 1 or 'auto', got {workers!r}")
    check_writable_folder(setup.output_dir, "output_dir")
    for key, url in (("study.storage", setup.storage), ("study.tracking_uri", setup.tracking_uri)):
        if url.startswith("sqlite:///"):
            check_writable_folder(Path(url.removeprefix("sqlite:///")).parent, key)
    check_sqlite_store(setup.storage, "optuna")  # a damaged store file: refused before any work
    check_sqlite_store(setup.tracking_uri, "mlflow")
    try:
        if setup.data.get("report") is not None:  # its mistakes now, not after the last trial
            from ..plan.report_block import parse_report

            parse_report(setup.data["report"], str(setup.config_path))
        preflight(setup.base)
    except (*ENVIRONMENT_ERRORS, ConfigError) as exc:
        return refuse(exc)
    tracker: StudyTracker | None = None
    parent_id: str | None = None
    try:
        tracker = _tracker(setup)
        study = open_study(setup, tracker)
        check_space_unchanged(setup.study, study)
        parent_id = tracker.parent_run(study_uid(study), _parent_tags(setup), _parent_params(setup))
        return _run_and_summarize(setup, workers, tracker, study, parent_id, reporting)
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:
            raise
        return _store_failed(setup, *failure, tracker, parent_id)


def _store_failed(setup: StudySetup, store: str, problem: str, tracker: StudyTracker | None,
                  parent_id: str | None) -> int:
    """A store failed during the study (a full disk, a file damaged under it): close the MLflow parent
    run when MLflow is not the store that failed, say which store and what to do; exit 1."""
    if tracker is not None and store != "mlflow":
        with contextlib.suppress(Exception):
            tracker.mark_failed(parent_id, f"the Optuna store failed: {problem}"[:2000])
    left = {"optuna": "the trial it ran may be left RUNNING in Optuna (its store could not be written): the next "
                      "start of this study marks it FAIL once its heartbeat is older than study.grace_period",
            "mlflow": "its Optuna trials are recorded FAIL; its MLflow runs may be left RUNNING (their store "
                      "could not be written)"}[store]
    url = setup.storage if store == "optuna" else setup.tracking_uri
    print(f"error: {store_message(store, url, problem)}.\nThe study stopped: {left}.",
          file=sys.stderr)
    return EXIT_FAILED


def _run_and_summarize(setup: StudySetup, workers: int | str, tracker: StudyTracker, study: optuna.Study,
                       parent_id: str, reporting: Reporting | None) -> int:
    """Run this invocation's trials (here or on ``workers`` processes), write the summary; the exit code."""
    tracker.save_view(setup.metric, list(setup.study.space), setup.study.direction == "maximize", *_groups(setup),
                      extra=[f"tags.`{FRONT_TAG}`"] if is_multi(setup.goals) else [])
    for key, value in (("mlflow_parent_run_id", parent_id), ("mlflow_tracking_uri", safe_url(setup.tracking_uri)),
                       ("config", str(setup.config_path)), ("metric", setup.metric)):
        study.set_user_attr(key, value)
    finished_before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    print("\n".join(ui_lines(setup.tracking_uri, tracker, setup.study.direction == "maximize")), flush=True)
    stop, worker_failed = run_stages(setup, study, lambda: open_study(setup, tracker),  # one without study.seeds
                                     lambda stage: _run_stage(setup, workers, tracker, stage, parent_id, reporting))
    study = open_study(setup, tracker)  # fresh trials, from every worker
    rows = tracker.summarize(parent_id, study, setup.metric, study_folder(setup, study) / "summary",
                             status="KILLED" if stop else "FINISHED")
    if stop is None:
        make_report(setup, reporting)
    post_answer(setup, tracker, study, reporting)  # with the report's link, now that it is made
    print_summary(setup, study, rows, study_folder(setup, study) / "summary", tracker)
    if stop is not None:
        print(f"stopped: {stop_reason(stop)}; finished trials are kept. Run the same command again to continue.")
        return stop_code(stop)
    if worker_failed:
        return 1
    ran = [t for t in study.trials if t.state.is_finished() and t.number not in finished_before]
    if ran and all(t.state == optuna.trial.TrialState.FAIL for t in ran):
        print(f"error: all {len(ran)} trial(s) of this run failed; their reasons are in the table above "
              "(and in each MLflow run's fail_reason tag).", file=sys.stderr)
        return 1
    return 0


def _run_stage(setup: StudySetup, workers: int | str, tracker: StudyTracker, study: optuna.Study,
               parent_id: str, reporting: Reporting | None) -> tuple[KeyboardInterrupt | None, bool]:
    """Run the trials of one stage (:func:`~dora_lab.study.seeds.stages`) here or on ``workers`` processes."""
    n_trials = trials_to_run(setup.study, study)  # a grid queues its missing points here (WAITING trials)
    workers = resolve_workers(workers, n_trials, setup.base.train.processes, setup)  # auto on a GPU: a probe trial
    more = f"{'until the timeout' if n_trials is None else n_trials} more{f' on {workers} workers' if workers > 1 else ''}"
    print(f"study {setup.name!r}: {sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))} finished "
          f"trial(s) so far in {safe_url(setup.storage)}; running {more}", flush=True)
    try:
        if workers == 1:
            optimize(setup, n_trials, parent_id, progress=sys.stderr.isatty(), tracker=tracker, study=study,
                     reporting=reporting)
        elif n_trials != 0:
            stop, failed = run_workers(setup, n_trials, workers, parent_id)
            left = 0 if stop else trials_to_run(setup.study, open_study(setup, tracker))
            if setup.study.sampler.name == "grid" and left:  # points a failed worker left
                optimize(setup, left, parent_id, tracker=tracker, study=open_study(setup, tracker), reporting=reporting)
            return stop, failed
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (dora_lab.run.cli.stoppable)
        return exc, False
    return None, False  # one worker, or nothing to run


def make_report(setup: StudySetup, reporting: Reporting | None) -> int | None:
    """The report of a config's ``report:`` block at the study's end (``reporting.report``:
    :func:`dora_lab.report.study_end.make_report`): its exit code; ``None``: no block, or no reporting."""
    if reporting is None or setup.data.get("report") is None:
        return None
    return reporting.report(setup)


@stoppable
def main(argv: Sequence[str] | None = None, reporting: Reporting | None = None) -> int:
    """The study runner's command line; ``reporting``: the answer and the report (the study command,
    :func:`dora_lab.studies.main`, hands them in)."""
    parser = argparse.ArgumentParser(prog="python -m dora_lab.study", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML config with a study: block, e.g. configs/cola.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path), e.g. --set study.n_trials=3")
    parser.add_argument("--workers", type=workers_arg, default=1,
                        help="worker processes on one storage (default 1), or auto: one per CPU on the CPU "
                             "(docs/throughput.md)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # 1, 2, ...: a worker
    parser.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-trials", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hide_store_tracebacks()  # a failing store is one error (_store_failed), not MLflow's logged traceback
    try:
        setup = prepare(args.config, args.overrides)
        if not args.worker:
            return run_study(setup, args.workers, reporting)
    except (ConfigError, StoreError) as exc:
        return refuse(exc)
    # a worker started by run_study
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        optimize(setup, args.n_trials, args.parent_run_id, progress=False, reporting=reporting)
    except KeyboardInterrupt as exc:  # its trial is recorded FAIL; the parent process writes the summary
        return stop_code(exc)
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:
            raise
        return _store_failed(setup, *failure, None, None)  # the parent process closes the parent run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

