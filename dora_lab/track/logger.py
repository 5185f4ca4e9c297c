"""One trial's MLflow child run: its tags, params, datasets, metrics and artifacts (:class:`TrialLogger`).

What a child run carries is described in :mod:`dora_lab.track` (the package's docstring).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from ..run.callbacks import RunInfo, RunResult, TrainCallback
from ..run.config import RunConfig, flatten
from ..run.environment import source_commit
from . import plots

__all__ = ["FIGURES", "STALE_TAG", "TrialLogger", "context_tags", "datasets", "effective_settings", "figure_title", "log_params",
           "run_name", "run_tags"]

FIGURES = ("rank_heatmap.png", "budget.png")  # a trial's figures, at its artifact root
#: "true" on the run of a trial that Optuna failed as stale (its heartbeat stopped: a killed worker, a
#: paused machine, a store too busy to take its beats), set together with its ``fail_reason``
STALE_TAG = "dora_lab.stale"
_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}
# the per-step logs under their MLflow names, grouped by namespace in the UI's charts
_STEP_KEYS = {"train_loss": "train/loss", "lr": "train/lr", "active_components": "budget/active_components",
              "active_parameters": "budget/active_parameters", "budget": "budget/target"}


def now_ms() -> int:
    """Milliseconds since the epoch: MLflow's timestamps."""
    return int(time.time() * 1000)


def _chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [items[i:i + n] for i in range(0, len(items), n)]



def run_tags(cfg: RunConfig, trial_number: int, run_dir: Path) -> dict[str, str]:
    b = cfg.budget
    return {
        "task": cfg.task.name, "model": cfg.model.name, "scorer": cfg.scorer.name,
        "schedule": cfg.schedule.name, "seed": str(cfg.seed), "trial": str(trial_number),
        "budget": f"rank {b.target_rank:g}" if b.target_rank is not None else f"params {b.target_params}",
        "dora_lab.adapter_dir": str((run_dir / "adapter").resolve()),
        "dora_lab.run_dir": str(run_dir.resolve()),
    }


def effective_settings(cfg: RunConfig, total_steps: int | None = None) -> dict[str, str]:
    """What the run's scorer, method, schedule and regulariser really use, beyond the config's own keys:
    the scorer's and the allocation method's every hyper-parameter (their defaults where ``scorer.params``
    / ``method.params`` are silent), the schedule's
    phases in steps (once ``total_steps`` is known) and the regulariser's weight (0 without one)."""
    from ..core import methods, regularizers, schedules, scorers

    hyper = {**scorers.get_scorer(cfg.scorer.name).hyperparameters(), **cfg.scorer.params}
    out = {f"scorer.effective.{k}": _param_text(v) for k, v in hyper.items()}
    method = {**methods.get_method(cfg.method.name).hyperparameters(), **cfg.method.params}
    out |= {f"method.effective.{k}": _param_text(v) for k, v in method.items()}
    reg = cfg.regularizer.name
    out["regularizer.effective.weight"] = str(cfg.regularizer.weight if reg else 0.0)
    if reg:
        out["regularizer.effective.stops_when_frozen"] = str(
            bool(getattr(regularizers.get_regularizer(reg), "stops_when_frozen", False)))
    if total_steps is not None:  # the phases in steps, as the controller counts them (core/schedules.py)
        warmup, final = schedules.phase_steps(cfg.schedule.warmup, cfg.schedule.final, total_steps)
        out |= {"schedule.effective.total_steps": str(total_steps),
                "schedule.effective.warmup_steps": str(warmup), "schedule.effective.final_steps": str(final)}
    return out


def _param_text(value: Any) -> str:
    return (json.dumps(value) if isinstance(value, list | dict) else str(value))[:6000]


def datasets(cfg: RunConfig) -> dict[str, Any]:
    """``{split: mlflow.data dataset}`` of the rows the run trains and evaluates on (``task.max_*_samples``
    and the seed applied, as training loads them): named ``<task>/<split>``, with the task's label as
    target, MLflow's digest of those rows, and as source ``task.data_dir`` or ``task.dataset`` (a local
    path) or the Hub dataset (``nyu-mll/glue``, config ``cola``, or ``task.dataset``'s, the split)."""
    import pandas as pd
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.pandas_dataset import from_pandas

    from ..run.tasks import get_task
    from ..run.token_cache import load_rows

    spec, t = get_task(cfg.task.name), cfg.task
    hub = ((t.dataset.path, t.dataset.config, t.dataset.split_names(spec.eval_splits)) if t.dataset else
           (spec.hub_path[0], spec.hub_path[1], {}))
    local = t.data_dir if t.data_dir is not None or t.dataset is None else t.dataset.path
    out = {}
    for split, rows in load_rows(cfg, spec).items():
        frame = pd.DataFrame(rows)
        source: Any = (str(Path(local).expanduser().resolve()) if local is not None and Path(local).expanduser().exists()
                       else HuggingFaceDatasetSource(hub[0], config_name=hub[1], split=hub[2].get(split, split)))
        with warnings.catch_warnings():  # a folder reads as two equal local sources; integer columns
            warnings.simplefilter("ignore")
            out[split] = from_pandas(frame, source=source, name=f"{spec.name}/{split}",
                                     targets="label" if "label" in frame else None)
    return out


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log ``params`` onto run ``run_id`` (in batches of 100, MLflow's limit)."""
    for chunk in _chunks([Param(k, v) for k, v in params.items()], 100):
        client.log_batch(run_id, params=list(chunk))


@cache
def context_tags() -> dict[str, str]:
    """MLflow's standard context tags, which :class:`MlflowClient` does not add by itself:
    ``mlflow.user``, ``mlflow.source.name`` (the entry point), ``mlflow.source.type`` and
    ``mlflow.source.git.commit``: the commit of the checkout this ``dora_lab`` is imported from, else
    (an installed package) that of the entry point's checkout, if any."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags({}).items()}
    commit = source_commit()
    if commit:
        tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.source.git.")}
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(params: Mapping[str, Any], trial_number: int) -> str:
    """A trial run's name from its searched values, e.g. ``sensitivity · seed 1 (t3)``: a text value
    alone, any other after its key's short name (``lr 0.003``, ``r0 4``), then the trial's number."""
    parts = [v if isinstance(v, str) else f"{k.rsplit('.', 1)[-1]} {f'{v:.3g}' if isinstance(v, float) else v}"
             for k, v in params.items()]
    return f"{' · '.join(parts)} (t{trial_number})" if parts else f"trial {trial_number}"


def figure_title(name: str, cfg: RunConfig, trial_number: int) -> str:
    """The first line of a trial's figures: its run name, then its scorer, schedule, seed and trial,
    so that pictures side by side (MLflow's compare page) or downloaded still say whose they are."""
    return f"{name}\nscorer {cfg.scorer.name} · schedule {cfg.schedule.name} · seed {cfg.seed} · trial {trial_number}"



class TrialLogger(TrainCallback):
    """Streams one trial's run into its MLflow child run (in batches: one call per evaluation)."""

    def __init__(self, client: MlflowClient, run_id: str, run_dir: Path, r0: int | None = None,
                 title: str = "") -> None:
        self.client, self.run_id, self.run_dir, self.r0 = client, run_id, run_dir, r0
        self.title = title  # names the run in its figures' titles (figure_title)
        self.cfg: RunConfig | None = None  # set by log_config: the effective schedule at train begin
        self._buffer: list[Metric] = []
        self.info: RunInfo | None = None
        self.active: dict[int, float] = {}
        self.done = False
        self.flush_every = 30.0  # seconds: metrics go out at every evaluation and at least this often
        self._flushed = now_ms()

    def log_config(self, cfg: RunConfig) -> None:
        """The flattened resolved config and the effective settings (:func:`effective_settings`) as params."""
        self.cfg = cfg
        flat = flatten({k: v for k, v in cfg.resolved().items() if k != "study"})
        self._params({**{k: _param_text(v) for k, v in flat.items()}, **effective_settings(cfg)})

    def log_datasets(self, cfg: RunConfig) -> None:
        """The run's train and evaluation data as MLflow datasets (:func:`datasets`), the training
        split with the context ``train``, the evaluation splits with ``eval``."""
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # the schema is inferred here: MLflow's integer-column hint, once per trial
            warnings.simplefilter("ignore", UserWarning)
            inputs = [DatasetInput(ds._to_mlflow_entity(),
                                   [InputTag("mlflow.data.context", "train" if split == "train" else "eval")])
                      for split, ds in datasets(cfg).items()]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def _params(self, params: Mapping[str, str]) -> None:
        log_params(self.client, self.run_id, params)

    # -- TrainCallback ----------------------------------------------------------------------------
    def on_train_begin(self, info: RunInfo) -> None:
        self.info = info
        if self.cfg is not None:  # the schedule's phases in steps, now that the run's length is known
            self._params({k: v for k, v in effective_settings(self.cfg, info.total_steps).items()
                          if k.startswith("schedule.")})
        self._buffer += [Metric("trainable_parameters", info.trainable_parameters, now_ms(), 0),
                         Metric(_STEP_KEYS["active_parameters"], info.adapter_parameters, now_ms(), 0)]
        self._buffer += [Metric(f"eval/{k}", float(v), now_ms(), 0)  # eval.at_start: the curves start at step 0
                         for k, v in info.initial_metrics.items() if math.isfinite(float(v))]

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        ts = now_ms()
        self._buffer += [Metric(name, float(logs[k]), ts, step + 1) for k, name in _STEP_KEYS.items() if k in logs]
        if "active_components" in logs:
            self.active[step + 1] = logs["active_components"]
        if ts - self._flushed > self.flush_every * 1000:  # keep the UI live on slow runs
            self.flush()

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        ts = now_ms()
        self._buffer += [Metric(f"eval/{k}", float(v), ts, step) for k, v in metrics.items()
                         if k != "step" and math.isfinite(float(v))]
        self.flush()

    def on_train_end(self, result: RunResult) -> None:
        ts = now_ms()  # one-off values: at step 0, so the UI shows them as values, not one-point curves
        self._buffer += [Metric(k, float(v), ts, 0) for k, v in (
            (f"best_{result.metric_name}", result.best_metric), ("best_step", result.best_step),
            ("active_components_final", result.active_components_final),
            ("adapter_parameters_final", result.adapter_parameters_final), ("minutes", result.minutes),
            ("peak_memory_mb", result.peak_memory_mb))]
        self.flush()
        flags = {f"dora_lab.{k}": json.dumps(result.checks[k]) for k in ("still_rising", "at_majority")
                 if k in result.checks}  # dora_lab.run.convergence: "true", "false" or "null" (not judged)
        env = {f"dora_lab.env.{k}": str(v) for k, v in result.environment.items() if v is not None}
        if flags or env:  # dora_lab.run.environment: what the run ran on
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in {**flags, **env}.items()])

    # -- the end of a trial -------------------------------------------------------------------------
    def flush(self) -> None:
        self._flushed = now_ms()
        buffer, self._buffer = self._buffer, []
        for chunk in _chunks(buffer, 900):
            self.client.log_batch(self.run_id, metrics=list(chunk))

    def finish(self, state: str, value: float | None = None, reason: str | None = None,
               values: Mapping[str, float] | None = None, stale: bool = False) -> None:
        """Send what is left, the pictures and files, the final tags; close the run with the status
        matching the Optuna state (COMPLETE, PRUNED, FAIL, INTERRUPTED).  ``value``: the first
        objective (metric ``objective``); ``values``: every objective of a multi-objective study by
        name (metrics ``objective/<name>``); ``stale``: Optuna failed the trial as stale
        (:data:`STALE_TAG`)."""
        if self.done:
            return
        self.done = True
        tags: dict[str, str] = {}
        try:
            self.flush()
            if value is not None:
                self.client.log_metric(self.run_id, "objective", value, step=0)
            if values is not None and len(values) > 1:
                self.client.log_batch(self.run_id, metrics=[Metric(f"objective/{k}", v, now_ms(), 0)
                                                             for k, v in values.items()])
            self._artifacts(adapter=state == "COMPLETE")
        except Exception as exc:  # a file or picture that cannot be logged must not change the trial's outcome
            tags["dora_lab.artifact_error"] = f"{type(exc).__name__}: {exc}"[:5000]
        finally:  # even when the store hiccups, the run must not stay RUNNING
            tags["state"] = "FAIL" if state == "INTERRUPTED" else state
            if reason:
                tags["fail_reason" if state != "PRUNED" else "prune_reason"] = reason[:5000]
            if stale:
                tags[STALE_TAG] = "true"
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.set_terminated(self.run_id, _STATUS[state])

    def _artifacts(self, adapter: bool = False) -> None:
        """The run folder's files and the figures; with ``adapter``, the saved adapter (``adapter/``:
        a few MB, the adapter's weights and the head, not the base model), so that
        ``python -m dora_lab.export RUN_ID`` works on a machine without the run folder."""
        d = self.run_dir
        if adapter and (d / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(d / "adapter"), "adapter")
        for name in ("config.yaml", "allocation.json", "metrics.json", "budget.json"):
            if (d / name).is_file():
                self.client.log_artifact(self.run_id, str(d / name))
        pictures = d / "plots"  # in the run folder; in MLflow at the artifact root (FIGURES)
        drawn = []
        if (d / "allocation.json").is_file():
            allocation = json.loads((d / "allocation.json").read_text())
            if allocation:
                total = sum(allocation.values())
                drawn.append(plots.allocation_heatmap(
                    allocation, pictures / FIGURES[0], r0=self.r0,
                    title=f"{self.title}\nfinal rank per matrix ({total} components)".strip()))
        if self.info is not None and self.info.budget_curve:
            drawn.append(plots.budget_plot(self.info.budget_curve, self.info.budget_unit, pictures / FIGURES[1],
                                           self.active if self.info.budget_unit == "components" else None,
                                           title=f"{self.title}\nbudget over training".strip()))
        for path in drawn:  # at the root: MLflow's compare page shows only top-level artifacts side by side
            self.client.log_artifact(self.run_id, str(path))


