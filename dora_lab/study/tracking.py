"""MLflow tracking of a study: one parent run per study, one child run per trial.

MLflow is imported here, by the study runner and by the tools that read finished runs
(:mod:`dora_lab.report.io`, :mod:`dora_lab.export.cli`).  This module talks to the tracking store through
:class:`mlflow.MlflowClient` (no global "active run"), so any process (a ``--workers`` worker, or
another machine in the distributed mode) can log a child under the same parent: the child carries
the tag ``mlflow.parentRunId``, which is what ``mlflow.start_run(nested=True)`` sets too.

The parent is found again by its tags (``dora_lab.study`` = the study name, ``dora_lab.role`` =
``study``, and ``dora_lab.study_uid`` = the Optuna study's identity: its creation time and a random
part, kept in the study's user attrs), so running a study again continues under the same parent
instead of adding one, and a new study of the same name (its ``optuna.db`` deleted, or a new storage
with the old ``output_dir``) gets a parent of its own instead of adopting the old one's.
A fresh SQLite or file store is created under a lock (:mod:`dora_lab.study.locks`), so processes that start
together on a new folder do not race through MLflow's migrations.

Child runs are named for their searched values (:func:`run_name`, e.g. ``sensitivity · seed 1 (t3)``;
the parent keeps the study's name) and get the trial's flattened resolved config as params, with the
effective scorer, method, schedule and regulariser settings (``scorer.effective.*``, ``method.effective.*``:
the defaults where ``scorer.params`` / ``method.params`` are silent; ``schedule.effective.*_steps``; ``regularizer.effective.*``); tags
``task model scorer schedule budget seed trial state`` (+ ``fail_reason`` or ``prune_reason``,
``dora_lab.adapter_dir``, ``dora_lab.run_dir``, ``dora_lab.worker``, ``dora_lab.still_rising`` and
``dora_lab.at_majority`` (:mod:`dora_lab.run.convergence`; ``true``/``false``/``null``), and
``dora_lab.artifact_error`` when a file could not be logged); metrics at every optimizer step (``train/loss train/lr
budget/active_components budget/active_parameters budget/target``), at every evaluation (the task's
metrics as ``eval/<metric>``) and once, at step 0 (``objective best_<metric> best_step
active_components_final adapter_parameters_final minutes peak_memory_mb trainable_parameters``), sent at each
evaluation and at least every 30 s; the train and evaluation rows as MLflow datasets
(:func:`datasets`); artifacts ``config.yaml``, ``allocation.json``, ``metrics.json``, ``budget.json``,
the figures ``rank_heatmap.png`` and ``budget.png`` at the artifact root (:data:`FIGURES`, titled
with their run: MLflow's compare page shows top-level artifacts side by side) and, for a COMPLETE
trial, its adapter (``adapter/``, for ``python -m dora_lab.export RUN_ID`` anywhere).  Status:
FINISHED (complete), KILLED (pruned or interrupted), FAILED.

The experiment is tagged as MLflow 3's model-training kind and the printed links
(:func:`ui_lines`: :func:`experiment_url`, :func:`compare_url`, :func:`run_url`) open the model-training
view (MLflow 3.17 decides it by the URL's ``workflowType``), the runs table filtered to the study's
trials and sorted by ``objective``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from ..run.callbacks import RunInfo, RunResult, TrainCallback
from ..run.config import RunConfig, flatten
from . import front, plots
from .grid import STALE_REASON
from .locks import store_lock
from .tables import markdown_table, write_table

if TYPE_CHECKING:
    from .space import StudySetup

__all__ = ["UID_TAG", "StudyTracker", "TrialLogger", "compare_url", "context_tags", "datasets", "experiment_url", "find_parent_runs",
           "filter_value", "log_params", "print_summary", "run_name", "run_url", "study_view", "trial_rows", "ui_address", "ui_lines"]

STUDY_TAG = "dora_lab.study"
ROLE_TAG = "dora_lab.role"
UID_TAG = "dora_lab.study_uid"
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {KIND_TAG: "custom_model_development"}  # MLflow 3: a model-training experiment
FIGURES = ("rank_heatmap.png", "budget.png")  # a trial's figures, at its artifact root
VIEW_TAG = "mlflow.sharedViewState."  # + key: a saved view of the runs table (study_view)
UI_PORT = 5000  # the port of the printed mlflow ui command
_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}
# the per-step logs under their MLflow names, grouped by namespace in the UI's charts
_STEP_KEYS = {"train_loss": "train/loss", "lr": "train/lr", "active_components": "budget/active_components",
              "active_parameters": "budget/active_parameters", "budget": "budget/target"}


def _now() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def safe_url(url: str) -> str:
    """``url`` without its password (for tags and printed messages)."""
    if "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


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
    if total_steps is not None:
        out |= {"schedule.effective.total_steps": str(total_steps),
                "schedule.effective.warmup_steps": str(schedules.resolve_steps(cfg.schedule.warmup, total_steps)),
                "schedule.effective.final_steps": str(schedules.resolve_steps(cfg.schedule.final, total_steps))}
    return out


def _param_text(value: Any) -> str:
    return (json.dumps(value) if isinstance(value, list | dict) else str(value))[:6000]


def datasets(cfg: RunConfig) -> dict[str, Any]:
    """``{split: mlflow.data dataset}`` of the rows the run trains and evaluates on (``task.max_*_samples``
    and the seed applied, as training loads them): named ``<task>/<split>``, with the task's label as
    target, MLflow's digest of those rows, and as source ``task.data_dir`` (a local folder) or the
    Hub dataset (``nyu-mll/glue``, config ``cola``, the split)."""
    import pandas as pd
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.pandas_dataset import from_pandas

    from ..run.data import load_splits
    from ..run.tasks import get_task

    spec = get_task(cfg.task.name)
    splits = load_splits(spec, cfg.task.data_dir, max_train_samples=cfg.task.max_train_samples,
                         max_eval_samples=cfg.task.max_eval_samples, seed=cfg.seed)
    out = {}
    for split, rows in splits.items():
        frame = pd.DataFrame(rows)
        source: Any = (str(Path(cfg.task.data_dir).resolve()) if cfg.task.data_dir is not None else
                       HuggingFaceDatasetSource(spec.hub_path[0], config_name=spec.hub_path[1], split=split))
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
    here = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here,
                                 capture_output=True, timeout=10).returncode == 0
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git here
        return tags
    if tracked and head.returncode == 0:
        tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.source.git.")}
        tags["mlflow.source.git.commit"] = head.stdout.strip()
    return tags


def ui_address(tracking_uri: str) -> str:
    """Where the MLflow UI of ``tracking_uri`` is: the server itself, or for a local store the
    address of the ``mlflow ui`` command :func:`print_summary` prints."""
    if tracking_uri.startswith(("http://", "https://")):
        return safe_url(tracking_uri).rstrip("/")
    return f"http://127.0.0.1:{UI_PORT}"


def experiment_url(ui: str, experiment_id: str, study: str | None = None, maximize: bool = True,
                   view: str | None = None) -> str:
    """The runs table of experiment ``experiment_id`` in the UI at ``ui``, in the model-training view;
    with ``study``, showing that study's trials, best first; with ``view``, the saved view of that
    key instead (:func:`study_view`: the same search and order, and the columns that matter).

    MLflow 3's UI (3.17) shows an experiment as GenAI (overview, traces) or as model training (the
    runs table) by its ``workflowType``: the query parameter of the experiment page's URL, else the
    last choice kept in the browser, else ``genai``.  The ``mlflow.experimentKind`` tag, which
    earlier 3.x UIs read, is set too (:meth:`StudyTracker._experiment`), but 3.17 decides by the
    URL: so the link says ``workflowType=machine_learning``.  The table's search and order are URL
    parameters as well (``searchFilter``, ``orderByKey``, ``orderByAsc``): the trials alone (child
    runs whose parent is filtered out are listed flat, not folded under the parent's row), sorted
    by ``objective``."""
    query = {"workflowType": "machine_learning"}
    if view is not None:  # the UI ignores a saved view when the URL has a search or an order of its own
        query["viewStateShareKey"] = view
    elif study is not None:
        query |= {"searchFilter": f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = '{study}'",
                  "orderByKey": "metrics.`objective`", "orderByAsc": "false" if maximize else "true"}
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def run_url(ui: str, experiment_id: str, run_id: str, artifact: str = "") -> str:
    """A run's page in the UI at ``ui``; with ``artifact``, that file opened in the run's artifacts."""
    page = f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/artifactPath/{artifact}?workflowType=machine_learning" if artifact else \
        f"{page}?workflowType=machine_learning"


def study_view(study: str, metric: str, searched: Sequence[str], maximize: bool = True,
               extra: Sequence[str] = ()) -> dict[str, Any]:
    """The runs table as a study wants it, as MLflow's UI keeps a shared view (``Views`` > share: an
    experiment tag ``mlflow.sharedViewState.<key>`` holding this JSON, opened by the URL parameter
    ``viewStateShareKey=<key>``): the study's trials flat, best ``objective`` first, and as columns
    the datasets, ``objective``, ``best_<metric>``, the final adapter size, the minutes and every
    searched key (then the ``extra`` columns: a multi-objective study's Pareto tag), instead of MLflow's
    default Source / Models / Dataset."""
    return {"searchFilter": f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = '{study}'",
            "orderByKey": "metrics.`objective`", "orderByAsc": not maximize,
            "selectedColumns": ["attributes.`Dataset`", "metrics.`objective`", f"metrics.`best_{metric}`",
                                "metrics.`adapter_parameters_final`", "metrics.`minutes`",
                                *(f"params.`{k}`" for k in searched), *extra]}


def compare_url(ui: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's compare page of ``run_ids`` (params, metrics and the top-level artifacts side by side)."""
    return (f"{ui.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(list(run_ids)), safe='')}"
            f"&experiments={quote(json.dumps([experiment_id]), safe='')}&workflowType=machine_learning")


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


def find_parent_runs(client: MlflowClient, experiment_id: str, study_name: str, uid: str | None,
                     max_results: int = 50) -> list[Any]:
    """The parent runs of study ``study_name`` in the experiment, oldest first: those of the study
    whose identity is ``uid`` (``None``: a study from before identities, any parent of that name).
    The one lookup of a parent run, for the runner (:meth:`StudyTracker.parent_run`) and the reports."""
    where = f"tags.`{STUDY_TAG}` = {filter_value(study_name)} and tags.`{ROLE_TAG}` = 'study'"
    if uid:  # the parent of this very study, not of an older one of the same name
        where += f" and tags.`{UID_TAG}` = {filter_value(uid)}"
    return list(client.search_runs([experiment_id], filter_string=where, max_results=max_results,
                                   order_by=["attributes.start_time ASC"]))


def filter_value(text: str) -> str:
    """``text`` as a string literal of an MLflow search filter: in single quotes, or in double quotes
    when it holds a single quote (``o'brien``; MLflow's filter grammar has no escapes, so a text with
    both quotes cannot be written: :func:`dora_lab.run.names.check_name` refuses ``"`` in names)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' in text:
        raise ValueError(f"{text!r} holds both quote characters; an MLflow filter cannot match it")
    return f'"{text}"'


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
        self._flushed = _now()

    def log_config(self, cfg: RunConfig) -> None:
        """The flattened resolved config and the effective settings (:func:`effective_settings`) as params."""
        self.cfg = cfg
        flat = flatten({k: v for k, v in cfg.resolved().items() if k != "study"})
        self._params({**{k: _param_text(v) for k, v in flat.items()}, **effective_settings(cfg)})

    def log_datasets(self, cfg: RunConfig) -> None:
        """The run's train and evaluation data as MLflow datasets (:func:`datasets`), the training
        split with the context ``train``, the evaluation splits with ``eval``."""
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "train" if split == "train" else "eval")])
            for split, ds in datasets(cfg).items()])

    def _params(self, params: Mapping[str, str]) -> None:
        log_params(self.client, self.run_id, params)

    # -- TrainCallback ----------------------------------------------------------------------------
    def on_train_begin(self, info: RunInfo) -> None:
        self.info = info
        if self.cfg is not None:  # the schedule's phases in steps, now that the run's length is known
            self._params({k: v for k, v in effective_settings(self.cfg, info.total_steps).items()
                          if k.startswith("schedule.")})
        self._buffer += [Metric("trainable_parameters", info.trainable_parameters, _now(), 0),
                         Metric(_STEP_KEYS["active_parameters"], info.adapter_parameters, _now(), 0)]
        self._buffer += [Metric(f"eval/{k}", float(v), _now(), 0)  # eval.at_start: the curves start at step 0
                         for k, v in info.initial_metrics.items() if math.isfinite(float(v))]

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        ts = _now()
        self._buffer += [Metric(name, float(logs[k]), ts, step + 1) for k, name in _STEP_KEYS.items() if k in logs]
        if "active_components" in logs:
            self.active[step + 1] = logs["active_components"]
        if ts - self._flushed > self.flush_every * 1000:  # keep the UI live on slow runs
            self.flush()

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        ts = _now()
        self._buffer += [Metric(f"eval/{k}", float(v), ts, step) for k, v in metrics.items()
                         if k != "step" and math.isfinite(float(v))]
        self.flush()

    def on_train_end(self, result: RunResult) -> None:
        ts = _now()  # one-off values: at step 0, so the UI shows them as values, not one-point curves
        self._buffer += [Metric(k, float(v), ts, 0) for k, v in (
            (f"best_{result.metric_name}", result.best_metric), ("best_step", result.best_step),
            ("active_components_final", result.active_components_final),
            ("adapter_parameters_final", result.adapter_parameters_final), ("minutes", result.seconds / 60),
            ("peak_memory_mb", result.peak_memory_mb))]
        self.flush()
        flags = {f"dora_lab.{k}": json.dumps(result.checks[k]) for k in ("still_rising", "at_majority")
                 if k in result.checks}  # dora_lab.run.convergence: "true", "false" or "null" (not judged)
        if flags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in flags.items()])

    # -- the end of a trial -------------------------------------------------------------------------
    def flush(self) -> None:
        self._flushed = _now()
        buffer, self._buffer = self._buffer, []
        for chunk in _chunks(buffer, 900):
            self.client.log_batch(self.run_id, metrics=list(chunk))

    def finish(self, state: str, value: float | None = None, reason: str | None = None,
               values: Mapping[str, float] | None = None) -> None:
        """Send what is left, the pictures and files, the final tags; close the run with the status
        matching the Optuna state (COMPLETE, PRUNED, FAIL, INTERRUPTED).  ``value``: the first
        objective (metric ``objective``); ``values``: every objective of a multi-objective study by
        name (metrics ``objective/<name>``)."""
        if self.done:
            return
        self.done = True
        tags: dict[str, str] = {}
        try:
            self.flush()
            if value is not None:
                self.client.log_metric(self.run_id, "objective", value, step=0)
            if values is not None and len(values) > 1:
                self.client.log_batch(self.run_id, metrics=[Metric(f"objective/{k}", v, _now(), 0)
                                                             for k, v in values.items()])
            self._artifacts(adapter=state == "COMPLETE")
        except Exception as exc:  # a file or picture that cannot be logged must not change the trial's outcome
            tags["dora_lab.artifact_error"] = f"{type(exc).__name__}: {exc}"[:5000]
        finally:  # even when the store hiccups, the run must not stay RUNNING
            tags["state"] = "FAIL" if state == "INTERRUPTED" else state
            if reason:
                tags["fail_reason" if state != "PRUNED" else "prune_reason"] = reason[:5000]
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


class StudyTracker:
    """The MLflow side of one study: its experiment, parent run, child runs and summary."""

    def __init__(self, tracking_uri: str, experiment: str, study_name: str,
                 artifact_root: Path | None = None) -> None:
        self.uri = tracking_uri
        self.study_name = study_name
        self.view_key: str | None = None  # the saved view of the runs table (save_view)
        with store_lock(tracking_uri, "mlflow"):  # the first access creates (migrates) a new store
            self.client = MlflowClient(tracking_uri)
            self.experiment_id = self._experiment(experiment, artifact_root)

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        """The experiment's id, created if new with the tag ``mlflow.experimentKind`` =
        ``custom_model_development`` (MLflow 3's model-training kind, see :func:`experiment_url`)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            local = self.uri.startswith("sqlite") or "://" not in self.uri
            location = (artifact_root / name).resolve().as_uri() if artifact_root is not None and local else None
            try:
                return str(self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS))
            except MlflowException:  # another process created it first
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if KIND_TAG not in exp.tags:  # made by an older dora_lab, or by hand
            with contextlib.suppress(MlflowException):
                self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, EXPERIMENT_TAGS[KIND_TAG])
        return str(exp.experiment_id)

    def save_view(self, metric: str, searched: Sequence[str], maximize: bool = True, extra: Sequence[str] = ()) -> str:
        """Save the study's view of the runs table (:func:`study_view`) as a shared view of the
        experiment; :meth:`runs_url` links to it from now on.  Returns its key."""
        import hashlib

        key = f"dora_lab-{hashlib.sha1(self.study_name.encode()).hexdigest()[:12]}"
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + key,
                                       json.dumps(study_view(self.study_name, metric, searched, maximize, extra)))
        self.view_key = key
        return key

    def runs_url(self, maximize: bool = True, ui: str | None = None) -> str:
        """The link to this study's trials in the runs table, model-training view, best first
        (:func:`experiment_url`; the saved view once :meth:`save_view` ran)."""
        return experiment_url(ui or ui_address(self.uri), self.experiment_id, self.study_name, maximize,
                              view=self.view_key)

    # -- the parent run ---------------------------------------------------------------------------
    def _parents(self, uid: str) -> list[Any]:
        return find_parent_runs(self.client, self.experiment_id, self.study_name, uid)

    def parent_run(self, uid: str, tags: Mapping[str, str] = {},  # noqa: B006 - read only
                   params: Mapping[str, str] = {}) -> str:  # noqa: B006 - read only
        """The parent run of the Optuna study whose identity is ``uid``, with ``params`` (the study's
        settings, logged once) and the context tags (:func:`context_tags`): found by its tags, or
        created (once, even when several processes race: the oldest wins and the others delete
        theirs).  A parent of another study with the same name is never reused."""
        found = self._parents(uid)
        if not found:
            run = self.client.create_run(self.experiment_id, run_name=self.study_name, tags={
                **context_tags(), STUDY_TAG: self.study_name, ROLE_TAG: "study", UID_TAG: uid, **tags})
            found = self._parents(uid) or [run]
            if found[0].info.run_id != run.info.run_id:
                self.client.delete_run(run.info.run_id)
        run_id = str(found[0].info.run_id)
        # the settings the study started with (a param cannot change: a resume adds new keys only;
        # a process started together may have logged them first)
        with contextlib.suppress(MlflowException):
            log_params(self.client, run_id, {k: v for k, v in params.items() if k not in found[0].data.params})
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def start_trial(self, parent_id: str, number: int, cfg: RunConfig, run_dir: Path,
                    params: Mapping[str, Any] = {}) -> TrialLogger:  # noqa: B006 - read only
        """The trial's child run, named for its searched values ``params`` (:func:`run_name`)."""
        tags = {**context_tags(), "mlflow.parentRunId": parent_id, STUDY_TAG: self.study_name, ROLE_TAG: "trial",
                "state": "RUNNING", "dora_lab.worker": f"{socket.gethostname()}:{os.getpid()}",
                **run_tags(cfg, number, run_dir)}
        name = run_name(params, number)
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return TrialLogger(self.client, str(run.info.run_id), run_dir, r0=cfg.adapter.r0,
                           title=figure_title(name, cfg, number))

    def mark_failed(self, run_id: str | None, reason: str) -> None:
        """Close a child run left RUNNING by a worker that died (a stale Optuna trial)."""
        if not run_id:
            return
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.log_batch(run_id, tags=[RunTag("state", "FAIL"), RunTag("fail_reason", reason)])
                self.client.set_terminated(run_id, "FAILED")
        except MlflowException:
            pass

    # -- the summary --------------------------------------------------------------------------------
    def summarize(self, parent_id: str, study: optuna.Study, metric: str, folder: Path,
                  status: str = "FINISHED") -> list[dict[str, Any]]:
        """Best trial (tags ``best.*``: its number, value, run and searched values; no metric copies of
        the child's, which would mix into the trials' charts), counts, comparison table and Optuna's
        plots onto the parent run."""
        rows = trial_rows(study)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            self.mark_failed(t.user_attrs.get("mlflow_run_id"), _reason(t))
        folder.mkdir(parents=True, exist_ok=True)
        write_table(rows, folder / "trials.csv", folder / "trials.md")
        notes = plots.study_plots(study, folder / "plots", target_name=metric)
        (folder / "plots" / "NOTES.txt").write_text("".join(f"{k}: {v}\n" for k, v in notes.items()) or "all drawn\n")
        counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
        step = len(rows)
        metrics = [Metric(f"n_{k.lower()}", v, _now(), step) for k, v in counts.items()]
        tags = {"n_trials": str(len(rows)), "optuna.metric": metric,
                "optuna.direction": ",".join(d.name.lower() for d in study.directions), **front.answer_tags(study)}
        front.pareto_figure(study, folder / "plots")
        front.mark_front(self.client, study)
        self.client.log_batch(parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_artifacts(parent_id, str(folder), "summary")
        self.client.set_terminated(parent_id, status)
        return rows


def _reason(t: optuna.trial.FrozenTrial) -> str:
    if t.state == optuna.trial.TrialState.FAIL:
        return str(t.user_attrs.get("fail_reason") or STALE_REASON)  # or a trial failed by an older dora_lab
    if t.state == optuna.trial.TrialState.PRUNED:
        return str(t.user_attrs.get("prune_reason", "pruned"))
    return ""


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value (the first objective's), whether it is on the Pareto
    front (a multi-objective study), the searched values, size, minutes, reason."""
    rows = []
    multi = front.is_multi_study(study)
    on_front = set(front.front_numbers(study)) if multi else set()
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({
            "trial": t.number, "state": t.state.name, "value": front.first_value(t),
            **({"pareto": t.number in on_front if t.state == optuna.trial.TrialState.COMPLETE else None}
               if multi else {}),
            **{k: v for k, v in t.params.items()},
            "components": t.user_attrs.get("active_components"),
            "adapter_params": t.user_attrs.get("adapter_parameters"),
            "minutes": round(seconds / 60, 2) if seconds is not None else None,
            "reason": _reason(t), "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
        })
    return rows


def print_summary(setup: StudySetup, study: optuna.Study, rows: list[dict[str, Any]], folder: Path,
                  tracker: StudyTracker | None = None) -> None:
    """The study's summary on the terminal: the trials (``rows`` from :meth:`StudyTracker.summarize`),
    the best one, where the summary ``folder`` is and how to open the MLflow UI on the study (with
    ``tracker``: the link to its runs table and to the compare page of its complete trials)."""
    keys = list(setup.study.space)
    multi = ["pareto", "adapter_params"] if front.is_multi_study(study) else []
    columns = ["trial", "state", "value", *multi[:1], *keys, "components", *multi[1:], "minutes", "reason"]
    short = [{c: r.get(c) for c in columns} for r in rows]
    print(f"\nstudy {setup.name!r} ({', '.join(f'{d} {m}' for m, d in setup.goals)}): {len(rows)} trial(s)")
    print(markdown_table(short, columns, width=48))
    for line in front.front_lines(study, setup.goals):
        print(line)
    print(f"summary (table, plots): {folder}")
    if tracker is not None:
        ids = [str(r["mlflow_run_id"]) for r in rows if r["state"] == "COMPLETE" and r["mlflow_run_id"]]
        print("\n".join(ui_lines(setup.tracking_uri, tracker, setup.study.direction == "maximize", ids)))


def ui_lines(tracking_uri: str, tracker: StudyTracker, maximize: bool = True, compare: Sequence[str] = ()) -> list[str]:
    """How to see the study in MLflow: for a local store the ``mlflow ui`` command (with this
    interpreter, so it works as printed without an activated virtualenv), the link to the runs table
    in the model-training view and, given run ids ``compare``, to their compare page."""
    lines = []
    if not tracking_uri.startswith(("http://", "https://")):
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                   "--host", "127.0.0.1", "--port", str(UI_PORT)]
        lines += ["open the MLflow UI on this study:", f"  {shlex.join(command)}", "then"]
    ui = ui_address(tracking_uri)
    lines.append(f"MLflow runs of this study: {tracker.runs_url(maximize, ui)}")
    if len(compare) > 1:
        lines.append(f"MLflow compare ({len(compare)} complete trials): {compare_url(ui, tracker.experiment_id, compare)}")
    return lines
