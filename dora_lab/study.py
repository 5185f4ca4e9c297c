"""Optuna studies over run configs, tracked in MLflow:
``python -m dora_lab.study CONFIG [--set key=value ...] [--workers N]``.

The config's ``study:`` block (:mod:`dora_lab.study_space`) says what to search and how; every
trial is one :func:`dora_lab.train.train_run` of the config with the trial's values set.

- Resuming: the same command again loads the same study (``load_if_exists``) from its storage and
  adds ``study.n_trials`` more trials; numbering continues, the MLflow parent run is found again by
  its tags.  A trial left RUNNING by a killed worker is marked FAIL once its heartbeat is older
  than ``study.grace_period`` (RDB storages).
- Parallel: ``--workers N`` runs N worker processes (this CLI with ``--worker``) on one storage,
  this invocation's trials split between them.  Distributed: give ``study.storage`` a PostgreSQL
  URL and ``study.tracking_uri`` an MLflow server, and run the same command on every machine.
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
import itertools
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .callbacks import RunInfo, TrainCallback
from .config import ConfigError, RunConfig, apply_overrides, load_config_dict, parse_assignment, read_yaml
from .data import DataError, load_splits
from .models import ModelLoadError, check_model
from .study_space import (
    CategoricalParam,
    StudyConfig,
    make_pruner,
    make_sampler,
    parse_study,
    read_study_block,
    suggest,
    trial_config,
)
from .tasks import get_task
from .tracking import StudyTracker, TrialLogger, markdown_table, safe_url

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
    study_dir: Path  # trials' run folders and the summary
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
    output_dir = Path(base.output_dir).resolve()
    name = study.study_name(config_path)
    return StudySetup(
        config_path=Path(config_path), overrides=list(overrides), data=data, cli=cli, base=base, study=study,
        name=name, storage=study.storage_url(output_dir), tracking_uri=study.tracking(output_dir),
        output_dir=output_dir, study_dir=output_dir / "studies" / name,
        metric=study.metric or get_task(base.task.name).main_metric,
    )


# -- Optuna ---------------------------------------------------------------------------------------
def open_study(setup: StudySetup, tracker: StudyTracker | None = None, worker: int = 0) -> optuna.Study:
    """Create or load the study; RDB storages get a heartbeat so dead workers' trials go stale.
    The sampler's seed is offset by the trials so far and the worker's index (see make_sampler)."""
    s = setup.study
    storage: Any = setup.storage
    if "://" in storage and not storage.startswith(("redis", "grpc")):
        if storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

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
    study.sampler = make_sampler(s, offset=len(study.get_trials(deepcopy=False)) + 1000 * worker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study


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
    that a missing data folder or an unreachable Hub is one clear error instead of a failed trial
    each.  Raises :class:`~dora_lab.data.DataError` or :class:`~dora_lab.models.ModelLoadError`."""
    load_splits(get_task(cfg.task.name), cfg.task.data_dir, max_train_samples=cfg.task.max_train_samples,
                max_eval_samples=cfg.task.max_eval_samples, seed=cfg.seed)
    check_model(cfg.model.name)


def make_objective(setup: StudySetup, tracker: StudyTracker, parent_id: str,
                   progress: bool = False) -> Callable[[optuna.Trial], float]:
    from .train import train_run

    def objective(trial: optuna.Trial) -> float:
        run_dir = setup.study_dir / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        logger: TrialLogger | None = None
        try:
            # inside the try: a space that no longer fits the stored trials (a choice added to a
            # categorical, say) fails here, and the trial must say why
            params = suggest(trial, setup.study.space)
            if setup.study.sampler.name == "grid":
                twin = _earlier_twin(trial, params)
                if twin is not None:  # two workers drew the same point at once: run it only once
                    trial.set_user_attr("duplicate_of", twin)
                    raise optuna.TrialPruned(f"grid point already taken by trial {twin}")
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
            if logger is not None:
                logger.finish("INTERRUPTED", reason="interrupted (KeyboardInterrupt / Ctrl-C)")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:2000]
            trial.set_user_attr("fail_reason", reason)
            if logger is not None:
                logger.finish("FAIL", reason=reason)
            if isinstance(exc, ENVIRONMENT_ERRORS):  # not the trial's values: every next trial would fail too
                print(f"error: trial {trial.number} could not load its data or model; stopping the study.\n"
                      f"{exc}", file=sys.stderr)
                trial.study.stop()
            raise

    return objective


def _earlier_twin(trial: optuna.Trial, params: dict[str, Any]) -> int | None:
    """The number of an earlier running or complete trial with the same grid point, if any."""
    states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
    for t in trial.study.get_trials(deepcopy=False, states=states):
        if t.number < trial.number and t.params == params:
            return t.number
    return None


def _retryable(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that failed for no fault of its own: interrupted, or left behind by a dead worker."""
    reason = str(t.user_attrs.get("fail_reason", ""))
    return t.state == optuna.trial.TrialState.FAIL and (not reason or reason.startswith("interrupted"))


def _trials_to_run(setup: StudySetup, study: optuna.Study) -> int | None:
    """This invocation's trial count.  For a grid: the points not yet run, at most n_trials; points
    whose trial was interrupted (Ctrl-C, a killed worker) are queued again."""
    n = setup.study.n_trials
    if setup.study.sampler.name != "grid":
        return n
    keys = sorted(setup.study.space)

    def point(t: optuna.trial.FrozenTrial) -> tuple[Any, ...]:  # a queued trial has its values in fixed_params
        values = t.params or t.system_attrs.get("fixed_params", {})
        return tuple(values.get(k) for k in keys)

    trials = study.get_trials(deepcopy=False)
    covered = {point(t) for t in trials if t.state != optuna.trial.TrialState.FAIL or not _retryable(t)}
    for t in trials:
        if _retryable(t) and len(t.params) == len(keys) and point(t) not in covered:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            covered.add(point(t))
            if "grid_id" in t.system_attrs:  # so that GridSampler treats the retry as that grid point
                queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))[-1]
                for key in ("grid_id", "search_space"):
                    study._storage.set_trial_system_attr(queued._trial_id, key, t.system_attrs[key])
    grid = setup.study.grid()
    trials = study.get_trials(deepcopy=False)  # with the retries just queued
    done = {point(t) for t in trials if t.state.is_finished() and not _retryable(t)}
    taken = done | {point(t) for t in trials if t.state in (optuna.trial.TrialState.WAITING,
                                                             optuna.trial.TrialState.RUNNING)}
    for values in itertools.product(*(grid[k] for k in keys)):
        if values not in taken:  # queue the missing points themselves: no sampler can skip them
            study.enqueue_trial(dict(zip(keys, values, strict=True)))
    left = len({tuple(p) for p in itertools.product(*(grid[k] for k in keys))} - done)  # points dropped from the grid do not count
    return left if n is None else min(n, left)


def optimize(setup: StudySetup, n_trials: int | None, parent_id: str | None = None, progress: bool = False,
             tracker: StudyTracker | None = None, study: optuna.Study | None = None, worker: int = 0) -> None:
    """Run ``n_trials`` trials in this process (``None``: until ``study.timeout``)."""
    tracker = tracker or _tracker(setup)
    study = study or open_study(setup, tracker, worker)
    parent_id = parent_id or tracker.parent_run(_parent_tags(setup))
    if n_trials is None or n_trials > 0:
        study.optimize(make_objective(setup, tracker, parent_id, progress), n_trials=n_trials,
                       timeout=setup.study.timeout, catch=(Exception,))


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
    threads = max(1, (os.cpu_count() or 1) // len(shares)) if shares else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # Own sessions: a Ctrl-C reaches this process only, which then stops each worker exactly once.
    procs = [subprocess.Popen(_worker_command(setup, n, parent_id, threads, i), env=env, start_new_session=True)
             for i, n in enumerate(shares)]
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
    try:
        preflight(setup.base)
    except ENVIRONMENT_ERRORS as exc:
        print(f"error: {exc}\nNothing was started or stored.", file=sys.stderr)
        return 2
    tracker = _tracker(setup)
    study = open_study(setup, tracker)
    _check_space_unchanged(setup, study)
    parent_id = tracker.parent_run(_parent_tags(setup))
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
            if setup.study.sampler.name == "grid" and left:  # points lost to duplicate draws
                optimize(setup, left, parent_id, tracker=tracker, study=open_study(setup, tracker))
    except KeyboardInterrupt:
        interrupted = True
    study = open_study(setup, tracker)  # fresh trials, from every worker
    rows = tracker.summarize(parent_id, study, setup.metric, setup.study_dir / "summary",
                             status="KILLED" if interrupted else "FINISHED")
    print_summary(setup, study, rows)
    if interrupted:
        print("stopped by Ctrl-C; finished trials are kept. Run the same command again to continue.")
        return 130
    if worker_failed:
        return 1
    ran = [t for t in study.trials if t.state.is_finished() and t.number not in finished_before
           and "duplicate_of" not in t.user_attrs]  # a pruned duplicate grid draw is no result
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
    print(f"summary (table, plots): {setup.study_dir / 'summary'}")
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # a worker started by run_study
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        optimize(setup, args.n_trials, args.parent_run_id, progress=False, worker=args.worker)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

