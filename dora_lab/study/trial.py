"""One study trial: its config, its MLflow child run, training, its value for Optuna.

- :func:`make_objective` builds the function the runner calls per trial: the trial's values are
  sampled (:func:`~dora_lab.study.samplers.suggest`) and set into the config, the trial gets its
  MLflow child run (always one per trial, even when it fails before training) and its run folder
  ``<study folder>/trial-NNN``, and it trains (its token rows read from, or written once to,
  ``<study folder>/cache``: :mod:`dora_lab.run.token_cache`), in this process or as a ``torchrun`` of
  ``train.processes`` ranks followed live.
- :class:`OpenRuns` holds the child run of a trial that ended well (COMPLETE, PRUNED) until the
  runner has told Optuna: the run then ends with the state Optuna kept.  A trial whose heartbeat
  went stale after its last write is FAIL in Optuna (another worker took over its point), and so
  FAILED in MLflow, tagged ``dora_lab.stale``, never FINISHED beside an Optuna FAIL.
- :class:`OptunaReporter` reports the study metric at every evaluation and prunes.
- :func:`objective_value`: ``study.objective: best`` is the best evaluation once pruning has ended
  (the budget met), ``final`` the last one.
- :func:`preflight` loads the base config's data and model once before any trial, so a missing
  data folder or an unreachable Hub is one error, not a failed trial each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from ..plan.objectives import is_multi, run_quantities, trial_values
from ..plan.setup import trial_config
from ..run.callbacks import RunInfo, TrainCallback
from ..run.cli import stop_reason
from ..run.config import RunConfig
from ..run.config_yaml import ConfigError
from ..run.distributed import run_in_processes
from ..run.load_report import hf_bars
from ..run.models import ModelLoadError, check_model
from ..run.rows import DataError
from ..run.tasks import get_task
from ..run.token_cache import load_rows
from ..track.logger import TrialLogger
from ..track.tracker import STALE_REASON, StudyTracker
from .samplers import suggest

if TYPE_CHECKING:
    from ..plan.setup import StudySetup

__all__ = ["ENVIRONMENT_ERRORS", "OpenRuns", "OptunaReporter", "make_objective", "objective_value", "preflight"]

ENVIRONMENT_ERRORS = (DataError, ModelLoadError)  # not the trial's values: every next trial would fail too


class OptunaReporter(TrainCallback):
    """Reports the study metric at every evaluation and prunes when the pruner says so (not in a
    multi-objective study, ``prune=False``: Optuna takes no intermediate values there)."""

    def __init__(self, trial: optuna.Trial, metric: str, prune: bool = True) -> None:
        self.trial, self.metric, self.prune = trial, metric, prune
        self.eligible_from = 0  # the first step with the final budget (pruning over)

    def on_train_begin(self, info: RunInfo) -> None:
        curve = info.budget_curve
        last = [i for i, b in enumerate(curve) if b != curve[-1]]
        self.eligible_from = (last[-1] + 2) if last else 0

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ConfigError(f"study.metric {self.metric!r} is not measured; the evaluation gives "
                              f"{', '.join(k for k in metrics if k != 'step')}")
        if not self.prune:
            return
        self.trial.report(metrics[self.metric], step)
        if self.trial.should_prune():
            reason = f"pruned at step {step}: {self.metric} = {metrics[self.metric]:.4f}"
            self.trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)


class OpenRuns:
    """The MLflow runs of trials that ended well (COMPLETE, PRUNED) before Optuna was told: ended by
    :meth:`close`, after the tell, with the state Optuna kept.  Ended before the tell, a run whose
    trial another worker failed as stale in between stayed FINISHED beside Optuna's FAIL."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[TrialLogger, str, dict[str, Any]]] = {}

    def hold(self, trial: optuna.Trial, logger: TrialLogger, state: str, **finish: Any) -> None:
        """Keep ``logger``'s run open until :meth:`close`: it ends ``state`` with ``finish``
        (:meth:`~dora_lab.track.logger.TrialLogger.finish`'s keywords) if Optuna keeps that state."""
        self._held[trial.number] = (logger, state, finish)

    def close(self, trial: optuna.Trial, kept: optuna.trial.FrozenTrial) -> None:
        """End the trial's held run (none: the objective ended it, a FAIL) as Optuna ``kept`` the
        trial: as held when the states agree, else FAILED with Optuna's ``fail_reason``."""
        held = self._held.pop(trial.number, None)
        if held is None:
            return
        logger, state, finish = held
        if kept.state.name == state:
            logger.finish(state, **finish)
            return
        reason = kept.user_attrs.get("fail_reason")
        logger.finish("FAIL", reason=str(reason or f"Optuna recorded the trial {kept.state.name}, not {state}"),
                      stale=reason == STALE_REASON)


def objective_value(setup: StudySetup, history: list[dict[str, float]], eligible_from: int,
                    quantities: Mapping[str, float] | None = None) -> list[float]:
    """The trial's value per objective (:func:`~dora_lab.plan.objectives.trial_values`): an evaluated
    metric per ``study.objective`` (best once pruning is over, or final), a run quantity from
    ``quantities``."""
    return trial_values(setup.goals, history, quantities or {}, setup.study.objective == "final", eligible_from)


def preflight(cfg: RunConfig) -> None:
    """Load the config's data and the model's config and tokenizer once, before any trial, so
    that a missing data folder, an unreachable Hub or a ``task.max_length`` the model cannot take is
    one clear error instead of a failed trial each.  Raises :class:`~dora_lab.run.rows.DataError`,
    :class:`~dora_lab.run.models.ModelLoadError` or :class:`~dora_lab.run.config_yaml.ConfigError`."""
    spec = get_task(cfg.task.name)
    check_model(cfg.model.name, cfg.task.max_length, task=spec, trainable=cfg.model.trainable,
                method=cfg.train.method)
    load_rows(cfg, spec)


def make_objective(setup: StudySetup, folder: Path, tracker: StudyTracker, parent_id: str, runs: OpenRuns,
                   progress: bool = False) -> Callable[[optuna.Trial], float | list[float]]:
    """One trial: its config, its MLflow child run (always one per trial, even when the trial fails
    before training), its run folder (``folder/trial-NNN``, named for the study and the trial; never
    one that holds a run already), training, its value.  Raises what the trial raised.  The child
    run of a trial that completes or is pruned is left open in ``runs``, for the runner to end
    after its tell (:meth:`OpenRuns.close`); a failed trial's run ends here."""
    from ..run.train import train_run

    def objective(trial: optuna.Trial) -> float | list[float]:
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
            logger = tracker.start_trial(parent_id, trial.number, cfg, run_dir, params)
            trial.set_user_attr("mlflow_run_id", logger.run_id)
            if error is not None:
                raise error
            logger.log_config(cfg)
            logger.log_datasets(cfg)
            reporter = OptunaReporter(trial, setup.metric, prune=not is_multi(setup.goals))
            if cfg.train.processes > 1:  # torchrun in other processes; the hooks follow rank 0 here
                result = run_in_processes(cfg, run_dir, [logger, reporter])
            else:
                with hf_bars(False):  # no "Loading weights" bar per trial (the training bar stays)
                    result = train_run(cfg, run_dir, [logger, reporter], progress=progress, data_cache=folder / "cache")
            values = objective_value(setup, result.history, reporter.eligible_from, run_quantities(result))
            for key, v in (("active_components", result.active_components_final),
                           ("adapter_parameters", result.adapter_parameters_final), ("best_step", result.best_step)):
                trial.set_user_attr(key, v)
            runs.hold(trial, logger, "COMPLETE", value=values[0],
                      values={m: v for (m, _), v in zip(setup.goals, values, strict=True)})
            return values if is_multi(setup.goals) else values[0]
        except optuna.TrialPruned as exc:
            if logger is not None:
                runs.hold(trial, logger, "PRUNED", reason=str(exc))
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # marked stale by another worker, which runs its point
            if logger is not None:  # the runner says its result is discarded
                logger.finish("FAIL", reason=STALE_REASON, stale=True)
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (dora_lab.run.cli.stoppable)
            _fail(trial, logger, "INTERRUPTED", stop_reason(exc))
            raise
        except Exception as exc:
            _fail(trial, logger, "FAIL", f"{type(exc).__name__}: {exc}"[:2000])
            if isinstance(exc, ENVIRONMENT_ERRORS):  # not the trial's values: every next trial would fail too
                print(f"error: trial {trial.number} could not load its data or model; stopping the study.\n"
                      f"{exc}", file=sys.stderr)
            raise

    def _fail(trial: optuna.Trial, logger: TrialLogger | None, state: str, reason: str) -> None:
        """Record why the trial failed in Optuna and close its MLflow run, the run even when Optuna's
        store cannot take the reason (a full disk): the caller re-raises what stopped the trial."""
        try:
            trial.set_user_attr("fail_reason", reason)
        finally:
            _child(logger, trial).finish(state, reason=reason)

    def _child(logger: TrialLogger | None, trial: optuna.Trial) -> TrialLogger:
        """The trial's MLflow run; created now if the trial failed before it had one (its values did
        not fit the space), so that Optuna and MLflow stay one to one."""
        if logger is None:
            logger = tracker.start_trial(parent_id, trial.number, setup.base, folder / f"trial-{trial.number:03d}",
                                         trial.params)
            trial.set_user_attr("mlflow_run_id", logger.run_id)
        return logger

    return objective
