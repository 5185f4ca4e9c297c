"""Optuna studies over run configs, tracked in MLflow:
``python -m dora_lab.study CONFIG [--set key=value ...] [--workers N]``.

The config's ``study:`` block (:mod:`dora_lab.study_space`) says what to search and how; every
trial is one :func:`dora_lab.train.train_run` of the config with the trial's values set.

- Resuming: the same command again loads the same study (``load_if_exists``) from its storage and
  adds ``study.n_trials`` more trials; numbering continues, the MLflow parent run is found again by
  its tags.  A trial left RUNNING by a killed worker is marked FAIL once its heartbeat is older
  than ``study.grace_period`` (RDB storages).
- Identity: a new study gets an identity (creation time + random part, :func:`open_study`); its
  MLflow parent run is matched by it, its trials' folders are
  ``<output_dir>/studies/<name>/<identity>/trial-NNN``.  A new study of an old name (``optuna.db``
  deleted, or a new storage with an old ``output_dir``) so never reuses the old parent or folders.
- Parallel: ``--workers N`` runs N worker processes (this CLI with ``--worker``) on one storage,
  this invocation's trials split between them.  Distributed: give ``study.storage`` a PostgreSQL
  URL and ``study.tracking_uri`` an MLflow server, and run the same command on every machine.
  Any number of processes may start the same study at once: stores are created under a lock, TPE
  and random seed trial n with ``seed + n`` (no two processes replay one draw), and a grid point is
  claimed (queued and asked for) under the storage's lock, so no point runs twice and every Optuna
  trial has exactly one MLflow run.
- Data-parallel trials: with ``train.processes: N`` each trial is a ``torchrun`` of N ranks
  (:func:`dora_lab.distributed.run_in_processes`) that this process follows live; ``--workers W``
  gives each worker its own N GPUs when the machine has W x N (else they share them).
- Failures: a trial that raises (including :class:`~dora_lab.train.DivergenceError` and an invalid
  sampled config) is recorded FAIL with the reason (trial user attr ``fail_reason``, MLflow tag
  ``fail_reason``) and the study goes on; Ctrl-C fails the running trial the same way and stops
  the study cleanly (exit 130) after writing the summary.  Before any trial the base config's data
  and model are loaded once (:func:`preflight`): a missing data folder or an unreachable Hub is one
  error (exit 2) that stores nothing.  A trial that still fails to load its data or model stops
  the study (every later trial would fail alike); a run whose trials all failed exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .callbacks import RunInfo, TrainCallback
from .cli import check_writable_folder, refuse
from .config import ConfigError, RunConfig, apply_overrides, load_config_dict, parse_assignment, read_yaml
from .data import DataError, load_splits
from .distributed import gpu_groups, run_in_processes, visible_gpus
from .locks import store_lock
from .models import ModelLoadError, check_model
from .study_space import (
    CategoricalParam,
    StudyConfig,
    check_scorer_params,
    make_pruner,
    make_sampler,
    parse_study,
    read_study_block,
    suggest,
    trial_config,
)
from .tasks import get_task
from .threads import worker_env, worker_threads
from .tracking import UID_TAG, StudyTracker, TrialLogger, markdown_table, safe_url

__all__ = ["StudySetup", "main", "prepare", "run_study"]


@dataclass
class StudySetup:
    """Everything a study needs, resolved once from the config file and ``--set`` overrides."""

    config_path: Path
    overrides: list[str]
    data: dict[str, Any]  # the config as plain data (file + --set), study block included
    cli: dict[str, Any]  # the --set values outside the study block, re-applied to every trial
    base: RunConfig  # the trial config before the searched values
    study: StudyConfig
    name: str
    storage: str
    tracking_uri: str
    output_dir: Path
    study_dir: Path  # <output_dir>/studies/<name>: a folder per study identity (study_folder) inside
    metric: str


def prepare(config_path: str | Path, overrides: Sequence[str] = ()) -> StudySetup:
    """Read, override and validate everything; :class:`ConfigError` before anything starts."""
    data = read_yaml(config_path)  # read_yaml checks the files; then the study block's own merge rule
    block = read_study_block(config_path)
    if block is not None:
        data["study"] = block
    data = apply_overrides(data, overrides)
    cfg = load_config_dict(data)
    study = parse_study(cfg.study, cfg.plugins)
    cli = {key: value for key, value in map(parse_assignment, overrides) if not key.startswith("study.")}
    for key in [k for k in cli if k in study.space]:  # the sampled value would replace it in every trial
        raise ConfigError(
            f"--set {key}={cli[key]}: the study searches {key!r} (study.space.{key}), so every trial would "
            f"replace this value with a sampled one.  To run with this value only, search just it: "
            f"--set 'study.space.{key}={{type: categorical, choices: [{cli[key]}]}}'; to search it, drop this --set")
    try:
        base = trial_config(data, study, {}, cli)
    except ConfigError as exc:
        raise ConfigError(f"the study's base config (study.overrides applied) is invalid: {exc}") from None
    check_scorer_params(study, base.scorer.name)
    output_dir = Path(base.output_dir).resolve()
    name = study.study_name(config_path)
    return StudySetup(
        config_path=Path(config_path), overrides=list(overrides), data=data, cli=cli, base=base, study=study,
        name=name, storage=study.storage_url(output_dir), tracking_uri=study.tracking(output_dir),
        output_dir=output_dir, study_dir=output_dir / "studies" / name,
        metric=study.metric or get_task(base.task.name).main_metric,
    )


# -- Optuna ---------------------------------------------------------------------------------------
def open_study(setup: StudySetup, tracker: StudyTracker | None = None) -> optuna.Study:
    """Create or load the study; RDB storages get a heartbeat so dead workers' trials go stale.

    Creating happens under the storage's lock (:func:`~dora_lab.locks.store_lock`): processes that
    start together on a fresh storage neither race through its tables nor give one study two
    identities.  A new study gets its identity (:data:`~dora_lab.tracking.UID_TAG`: creation time and
    a random part) as a user attr; its MLflow parent run and its trial folders are named for it, so a
    new study of an old name (its ``optuna.db`` deleted) never takes over the old one's."""
    s = setup.study
    storage: Any = setup.storage
    with store_lock(setup.storage):
        if "://" in storage and not storage.startswith(("redis", "grpc")):
            def stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                if tracker is not None:
                    tracker.mark_failed(trial.user_attrs.get("mlflow_run_id"),
                                        "worker stopped sending heartbeats (killed?); marked stale")

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    storage, engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {},
                    heartbeat_interval=s.heartbeat_interval, grace_period=s.grace_period,
                    heartbeat_stale_trial_callback=stale if s.heartbeat_interval else None)
        study = optuna.create_study(storage=storage, study_name=setup.name, direction=s.direction,
                                    sampler=make_sampler(s), pruner=make_pruner(s), load_if_exists=True)
        if UID_TAG not in study.user_attrs:  # new (or made by a dora_lab from before identities)
            study.set_user_attr(UID_TAG, f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}")
    _fail_stale(study)
    return study


def study_uid(study: optuna.Study) -> str:
    """The study's identity, set by :func:`open_study`."""
    return str(study.user_attrs[UID_TAG])


def study_folder(setup: StudySetup, study: optuna.Study) -> Path:
    """``<output_dir>/studies/<name>/<identity>``: this study's trial folders and summary."""
    return setup.study_dir / study_uid(study)


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class OptunaReporter(TrainCallback):
    """Reports the study metric at every evaluation and prunes when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.eligible_from = 0  # the first step with the final budget (pruning over)

    def on_train_begin(self, info: RunInfo) -> None:
        curve = info.budget_curve
        last = [i for i, b in enumerate(curve) if b != curve[-1]]
        self.eligible_from = (last[-1] + 2) if last else 0

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ConfigError(f"study.metric {self.metric!r} is not measured; the evaluation gives "
                              f"{', '.join(k for k in metrics if k != 'step')}")
        self.trial.report(metrics[self.metric], step)
        if self.trial.should_prune():
            reason = f"pruned at step {step}: {self.metric} = {metrics[self.metric]:.4f}"
            self.trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)


def _objective_value(setup: StudySetup, history: list[dict[str, float]], eligible_from: int) -> float:
    if setup.study.objective == "final":
        return float(history[-1][setup.metric])
    values = [h[setup.metric] for h in history if h["step"] >= eligible_from] or [history[-1][setup.metric]]
    return float(max(values) if setup.study.direction == "maximize" else min(values))


ENVIRONMENT_ERRORS = (DataError, ModelLoadError)


def preflight(cfg: RunConfig) -> None:
    """Load the config's data and the model's config and tokenizer once, before any trial, so
    that a missing data folder, an unreachable Hub or a ``task.max_length`` the model cannot take is
    one clear error instead of a failed trial each.  Raises :class:`~dora_lab.data.DataError`,
    :class:`~dora_lab.models.ModelLoadError` or :class:`~dora_lab.config.ConfigError`."""
    load_splits(get_task(cfg.task.name), cfg.task.data_dir, max_train_samples=cfg.task.max_train_samples,
                max_eval_samples=cfg.task.max_eval_samples, seed=cfg.seed)
    check_model(cfg.model.name, cfg.task.max_length)


def make_objective(setup: StudySetup, study: optuna.Study, tracker: StudyTracker, parent_id: str,
                   progress: bool = False) -> Callable[[optuna.Trial], float]:
    """One trial: its config, its MLflow child run (always one per trial, even when the trial fails
    before training), its run folder (named for the study and the trial; never one that holds a
    run already), training, its value.  Raises what the trial raised, for :func:`_run_trials`."""
    from .train import train_run

    folder = study_folder(setup, study)

    def objective(trial: optuna.Trial) -> float:
        run_dir = folder / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        logger: TrialLogger | None = None
        try:
            # inside the try: a space that no longer fits the stored trials (a choice added to a
            # categorical, say) fails here, and the trial must say why
            params = suggest(trial, setup.study.space)
            try:
                cfg, error = trial_config(setup.data, setup.study, params, setup.cli), None
            except ConfigError as exc:
                cfg, error = setup.base, exc
            logger = tracker.start_trial(parent_id, trial.number, cfg, run_dir)
            trial.set_user_attr("mlflow_run_id", logger.run_id)
            if error is not None:
                raise error
            logger.log_config(cfg)
            reporter = OptunaReporter(trial, setup.metric)
            if cfg.train.processes > 1:  # torchrun in other processes; the hooks follow rank 0 here
                result = run_in_processes(cfg, run_dir, [logger, reporter])
            else:
                result = train_run(cfg, run_dir, [logger, reporter], progress=progress)
            value = _objective_value(setup, result.history, reporter.eligible_from)
            for key, v in (("active_components", result.active_components_final),
                           ("adapter_parameters", result.adapter_parameters_final), ("best_step", result.best_step)):
                trial.set_user_attr(key, v)
            logger.finish("COMPLETE", value=value)
            return value
        except optuna.TrialPruned as exc:
            if logger is not None:
                logger.finish("PRUNED", reason=str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (KeyboardInterrupt / Ctrl-C)")
            _child(logger, trial).finish("INTERRUPTED", reason="interrupted (KeyboardInterrupt / Ctrl-C)")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:2000]
            trial.set_user_attr("fail_reason", reason)
            _child(logger, trial).finish("FAIL", reason=reason)
            if isinstance(exc, ENVIRONMENT_ERRORS):  # not the trial's values: every next trial would fail too
                print(f"error: trial {trial.number} could not load its data or model; stopping the study.\n"
                      f"{exc}", file=sys.stderr)
            raise

    def _child(logger: TrialLogger | None, trial: optuna.Trial) -> TrialLogger:
        """The trial's MLflow run; created now if the trial failed before it had one (its values did
        not fit the space), so that Optuna and MLflow stay one to one."""
        if logger is None:
            logger = tracker.start_trial(parent_id, trial.number, setup.base, folder / f"trial-{trial.number:03d}")
            trial.set_user_attr("mlflow_run_id", logger.run_id)
        return logger

    return objective


@contextlib.contextmanager
def _heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every ``heartbeat_interval`` seconds while it runs (RDB storages
    with a heartbeat), as ``study.optimize`` does, so that a killed worker's trial goes stale."""
    storage: Any = trial.storage  # an RDBStorage, wrapped by Optuna in its cache
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()
    trial_id = trial._trial_id  # Optuna's own heartbeat thread keys on it too

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _retryable(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that failed for no fault of its own: interrupted, or left behind by a dead worker."""
    reason = str(t.user_attrs.get("fail_reason", ""))
    return t.state == optuna.trial.TrialState.FAIL and (not reason or reason.startswith("interrupted"))


def _point(t: optuna.trial.FrozenTrial, keys: Sequence[str]) -> tuple[Any, ...]:
    values = t.params or t.system_attrs.get("fixed_params", {})  # a queued trial: fixed_params
    return tuple(values.get(k) for k in keys)


def _grid_state(setup: StudySetup, trials: Sequence[optuna.trial.FrozenTrial]
                ) -> tuple[list[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """(the grid's points in order, the points a trial holds: queued, running or finished, except
    a trial interrupted or left by a dead worker, whose point is free to run again)."""
    keys = sorted(setup.study.space)
    grid = setup.study.grid()
    points = list(dict.fromkeys(itertools.product(*(grid[k] for k in keys))))
    return points, {_point(t, keys) for t in trials if not _retryable(t)}


def _trials_to_run(setup: StudySetup, study: optuna.Study) -> int | None:
    """This invocation's trial count.  For a grid: the points no trial holds, at most n_trials."""
    n = setup.study.n_trials
    if setup.study.sampler.name != "grid":
        return n
    points, taken = _grid_state(setup, study.get_trials(deepcopy=False))
    left = len([p for p in points if p not in taken])  # points dropped from the grid do not count
    return left if n is None else min(n, left)


def _claim_grid_point(setup: StudySetup, study: optuna.Study) -> optuna.Trial | None:
    """The next grid trial, or ``None`` when every point is held.  Choosing the point and creating
    its trial happen in one step under the storage's lock, so two processes never take one point
    and no trial is ever created that has no point to run (what made the duplicate PRUNED trials)."""
    keys = sorted(setup.study.space)
    with store_lock(setup.storage, f"optuna:{setup.name}"):
        while True:
            trials = study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
            if waiting:  # a queue entry left behind (an older dora_lab, a process killed mid-claim)
                mine = _point(waiting[0], keys)
                others = {_point(t, keys) for t in trials if t.number != waiting[0].number and not _retryable(t)}
                trial = study.ask()  # pops the oldest waiting trial: waiting[0]
                if mine not in others:
                    return trial
                trial.set_user_attr("fail_reason", "a second queue entry for a grid point another trial holds "
                                                   "(left by an older dora_lab); not run")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            points, taken = _grid_state(setup, trials)
            free = [p for p in points if p not in taken]
            if not free:
                return None
            retry = [t.number for t in trials if _retryable(t) and _point(t, keys) == free[0]]
            study.enqueue_trial(dict(zip(keys, free[0], strict=True)),
                                user_attrs={"retry_of": retry[-1]} if retry else None)
            return study.ask()  # pops the trial just queued: no other is waiting


def _run_trials(setup: StudySetup, study: optuna.Study, objective: Callable[[optuna.Trial], float],
                n_trials: int | None) -> None:
    """Ask, run and tell up to ``n_trials`` trials (``None``: no limit) until ``study.timeout``; a grid
    also stops when no point is left.  A failed trial is recorded FAIL and the next one runs, except
    after a data or model error (every next trial would fail too); Ctrl-C records FAIL and stops."""
    started, ran = time.monotonic(), 0
    while n_trials is None or ran < n_trials:
        if setup.study.timeout is not None and time.monotonic() - started >= setup.study.timeout:
            return
        _fail_stale(study)
        with warnings.catch_warnings():  # Optuna's note that heartbeats come with optimize(): _heartbeat beats
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = _claim_grid_point(setup, study) if setup.study.sampler.name == "grid" else study.ask()
        if trial is None:
            return
        ran += 1
        with _heartbeat(trial):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            except KeyboardInterrupt:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            except Exception as exc:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                if isinstance(exc, ENVIRONMENT_ERRORS):
                    return
            else:
                study.tell(trial, value)


def optimize(setup: StudySetup, n_trials: int | None, parent_id: str | None = None, progress: bool = False,
             tracker: StudyTracker | None = None, study: optuna.Study | None = None) -> None:
    """Run ``n_trials`` trials in this process (``None``: until ``study.timeout``, or a grid's end)."""
    tracker = tracker or _tracker(setup)
    study = study or open_study(setup, tracker)
    parent_id = parent_id or tracker.parent_run(study_uid(study), _parent_tags(setup))
    if n_trials is None or n_trials > 0:
        _run_trials(setup, study, make_objective(setup, study, tracker, parent_id, progress), n_trials)


def _tracker(setup: StudySetup) -> StudyTracker:
    return StudyTracker(setup.tracking_uri, setup.study.experiment or setup.name, setup.name,
                        artifact_root=setup.output_dir / "mlartifacts")


def _parent_tags(setup: StudySetup) -> dict[str, str]:
    s = setup.study
    return {"config": str(setup.config_path), "optuna.storage": safe_url(setup.storage),
            "optuna.sampler": s.sampler.name, "optuna.pruner": s.pruner.name,
            "dora_lab.space": ", ".join(s.space) or "(none)", "task": setup.base.task.name,
            "model": setup.base.model.name, "mlflow.note.content": f"Optuna study {setup.name!r} "
            f"({s.direction} {setup.metric}); one child run per trial."}


# -- the whole study ------------------------------------------------------------------------------
def _worker_command(setup: StudySetup, n: int | None, parent_id: str, threads: int, index: int) -> list[str]:
    cmd = [sys.executable, "-m", "dora_lab.study", str(setup.config_path)]
    for item in setup.overrides:
        cmd += ["--set", item]
    cmd += ["--worker", str(index + 1), "--parent-run-id", parent_id, "--threads", str(threads)]
    return cmd + (["--n-trials", str(n)] if n is not None else [])


def _run_workers(setup: StudySetup, n_trials: int | None, workers: int, parent_id: str) -> tuple[bool, bool]:
    """Start the workers, wait for them; ``(Ctrl-C stopped them, a worker failed)``."""
    shares: list[int | None] = [None] * workers if n_trials is None else [
        n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    shares = [s for s in shares if s != 0]
    threads = worker_threads(len(shares))
    env = worker_env(threads)
    # each worker its own GPUs when there are enough for all (train.processes per trial)
    gpus = gpu_groups(visible_gpus(), len(shares), setup.base.train.processes)
    # Own sessions: a Ctrl-C reaches this process only, which then stops each worker exactly once.
    procs = [subprocess.Popen(_worker_command(setup, n, parent_id, threads, i), start_new_session=True,
                              env=env if g is None else {**env, "CUDA_VISIBLE_DEVICES": g})
             for i, (n, g) in enumerate(zip(shares, gpus, strict=True))]
    interrupted = False
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the workers (their running trials are recorded as FAIL) ...",
              file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    bad = [p.returncode for p in procs if p.returncode not in (0, 130, -signal.SIGINT)]
    if bad:
        print(f"error: {len(bad)} worker(s) exited with codes {bad}; their output is above", file=sys.stderr)
    return interrupted, bool(bad)


def run_study(setup: StudySetup, workers: int = 1) -> int:
    """The CLI's main path: open the study and its parent run, run the trials, summarize."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    check_writable_folder(setup.output_dir, "output_dir")
    for key, url in (("study.storage", setup.storage), ("study.tracking_uri", setup.tracking_uri)):
        if url.startswith("sqlite:///"):
            check_writable_folder(Path(url.removeprefix("sqlite:///")).parent, key)
    try:
        preflight(setup.base)
    except (*ENVIRONMENT_ERRORS, ConfigError) as exc:
        return refuse(exc)
    tracker = _tracker(setup)
    study = open_study(setup, tracker)
    _check_space_unchanged(setup, study)
    parent_id = tracker.parent_run(study_uid(study), _parent_tags(setup))
    for key, value in (("mlflow_parent_run_id", parent_id), ("mlflow_tracking_uri", safe_url(setup.tracking_uri)),
                       ("config", str(setup.config_path)), ("metric", setup.metric)):
        study.set_user_attr(key, value)
    finished_before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    n_trials = _trials_to_run(setup, study)  # a grid queues its missing points here (WAITING trials)
    print(f"study {setup.name!r}: {len(finished_before)} finished trial(s) so far in {safe_url(setup.storage)}; running "
          f"{'until the timeout' if n_trials is None else n_trials} more"
          f"{f' on {workers} workers' if workers > 1 else ''}", flush=True)
    interrupted = worker_failed = False
    try:
        if workers == 1:
            optimize(setup, n_trials, parent_id, progress=sys.stderr.isatty(), tracker=tracker, study=study)
        elif n_trials != 0:
            interrupted, worker_failed = _run_workers(setup, n_trials, workers, parent_id)
            left = 0 if interrupted else _trials_to_run(setup, open_study(setup, tracker))
            if setup.study.sampler.name == "grid" and left:  # points a failed worker left
                optimize(setup, left, parent_id, tracker=tracker, study=open_study(setup, tracker))
    except KeyboardInterrupt:
        interrupted = True
    study = open_study(setup, tracker)  # fresh trials, from every worker
    rows = tracker.summarize(parent_id, study, setup.metric, study_folder(setup, study) / "summary",
                             status="KILLED" if interrupted else "FINISHED")
    print_summary(setup, study, rows)
    if interrupted:
        print("stopped by Ctrl-C; finished trials are kept. Run the same command again to continue.")
        return 130
    if worker_failed:
        return 1
    ran = [t for t in study.trials if t.state.is_finished() and t.number not in finished_before]
    if ran and all(t.state == optuna.trial.TrialState.FAIL for t in ran):
        print(f"error: all {len(ran)} trial(s) of this run failed; their reasons are in the table above "
              "(and in each MLflow run's fail_reason tag).", file=sys.stderr)
        return 1
    return 0


def _check_space_unchanged(setup: StudySetup, study: optuna.Study) -> None:
    """Optuna refuses a categorical whose choices differ from the study's earlier trials (every new
    trial would fail); say so before any trial starts.  Float and int ranges may change."""
    for t in study.get_trials(deepcopy=False):
        for key, dist in t.distributions.items():
            param = setup.study.space.get(key)
            if isinstance(dist, optuna.distributions.CategoricalDistribution) and isinstance(param, CategoricalParam) \
                    and list(dist.choices) != list(param.choices):
                raise ConfigError(
                    f"study.space.{key}: the choices {list(param.choices)} differ from those of the study "
                    f"{setup.name!r} so far {list(dist.choices)}; Optuna cannot change a categorical within "
                    f"one study.  Start a new one: --set study.name={setup.name}_v2 (same storage, new trials)")


def print_summary(setup: StudySetup, study: optuna.Study, rows: list[dict[str, Any]]) -> None:
    keys = list(setup.study.space)
    columns = ["trial", "state", "value", *keys, "components", "minutes", "reason"]
    short = [{c: r.get(c) for c in columns} for r in rows]
    print(f"\nstudy {setup.name!r} ({setup.study.direction} {setup.metric}): {len(rows)} trial(s)")
    print(markdown_table(short, columns, width=48))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        print(f"best: trial {best.number}, {setup.metric} = {best.value:.4f}, "
              f"{', '.join(f'{k}={v}' for k, v in best.params.items())}\n      run folder {best.user_attrs.get('run_dir')}")
    print(f"summary (table, plots): {study_folder(setup, study) / 'summary'}")
    if setup.tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow: open {setup.tracking_uri} (experiment {setup.study.experiment or setup.name!r})")
    else:
        print("open the MLflow UI on this study:\n  mlflow ui --backend-store-uri "
              f"{setup.tracking_uri} --host 127.0.0.1 --port 5000")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dora_lab.study", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML config with a study: block, e.g. configs/cola.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path), e.g. --set study.n_trials=3")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on one storage (default 1)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # 1, 2, ...: a worker
    parser.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-trials", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        setup = prepare(args.config, args.overrides)
        if not args.worker:
            return run_study(setup, args.workers)
    except ConfigError as exc:
        return refuse(exc)
    # a worker started by run_study
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        optimize(setup, args.n_trials, args.parent_run_id, progress=False)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

