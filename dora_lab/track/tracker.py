"""The MLflow side of one study (:class:`StudyTracker`): its experiment, parent run, child runs and summary.

What the parent run carries is described in :mod:`dora_lab.track` (the package's docstring).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag
from mlflow.exceptions import MlflowException

from ..run.cli import stop_safe
from ..run.config import RunConfig, flatten
from . import front, plots
from .links import ROLE_TAG, STUDY_TAG, experiment_url, filter_value, group_color, study_view, ui_address
from .locks import store_lock
from .logger import STALE_TAG, TrialLogger, context_tags, figure_title, log_params, now_ms, run_name, run_tags
from .tables import write_table

CLOSED_TAG = "dora_lab.closed_at_study_end"  # a told trial's run its worker never ended
WORKER_TAG = "dora_lab.worker"  # host:pid of the process that runs the trial
#: A told trial's run whose worker is on another host is closed only this long after the tell:
#: that worker may still be logging its last metrics and artifacts (the run ends after the tell)
TOLD_GRACE_S = 600.0

__all__ = ["CLOSED_TAG", "EXPERIMENT_TAGS", "KIND_TAG", "STALE_REASON", "TOLD_GRACE_S", "UID_TAG", "VIEW_TAG",
           "WORKER_TAG", "StoreClient", "StudyTracker", "find_parent_runs", "trial_rows", "worker_may_still_end"]

UID_TAG = "dora_lab.study_uid"
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {KIND_TAG: "custom_model_development"}  # MLflow 3: a model-training experiment
RUN_COLOR_TAG = "mlflow.runColor"  # a run's colour in MLflow's charts and table
VIEW_TAG = "mlflow.sharedViewState."  # + key: a saved view of the runs table (study_view)
#: A trial that the heartbeat marked failed (its worker was killed): its reason in Optuna and MLflow
STALE_REASON = "worker stopped sending heartbeats (killed?); marked stale"

#: MLflow's client with a stop (Ctrl-C, SIGTERM) held off while a call runs (:func:`~dora_lab.run.cli.stop_safe`):
#: every MLflow client dora_lab makes is one (tests/test_stops.py checks)
StoreClient = stop_safe(MlflowClient)


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



class StudyTracker:
    """The MLflow side of one study: its experiment, parent run, child runs and summary."""

    def __init__(self, tracking_uri: str, experiment: str, study_name: str,
                 artifact_root: Path | None = None) -> None:
        self.uri = tracking_uri
        self.study_name = study_name
        self.view_key: str | None = None  # the saved view of the runs table (save_view)
        self.factors: list[str] = []  # the params that make a trial's group (save_view), and the
        self.groups: list[tuple[str, ...]] = []  # groups in grid order: their colours (group_color)
        self.parent_id: str | None = None  # the study's parent run (parent_run)
        with store_lock(tracking_uri, "mlflow"):  # the first access creates (migrates) a new store
            self.client = StoreClient(tracking_uri)
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

    def save_view(self, metric: str, searched: Sequence[str], maximize: bool = True, factors: Sequence[str] = (),
                  groups: Sequence[Sequence[str]] = (), extra: Sequence[str] = ()) -> str:
        """Save the study's view of the runs table (:func:`study_view`, grouped by ``factors`` with its
        charts) as a shared view of the experiment; :meth:`runs_url` links to it from now on, and
        trials started from now on get their group's colour (``groups``: the groups in grid order,
        :func:`group_color`).  Returns its key."""
        import hashlib

        key = f"dora_lab-{hashlib.sha1(self.study_name.encode()).hexdigest()[:12]}"
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + key,
                                       json.dumps(study_view(self.study_name, metric, searched, maximize, factors, extra)))
        self.view_key, self.factors, self.groups = key, list(factors), [tuple(g) for g in groups]
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
        run_id = self.parent_id = str(found[0].info.run_id)
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
                "state": "RUNNING", WORKER_TAG: f"{socket.gethostname()}:{os.getpid()}",
                **run_tags(cfg, number, run_dir)}
        if self.factors:  # its group's colour in the charts (MLflow reads a run's colour from this tag)
            group = [str(params.get(k, flatten(cfg.resolved()).get(k))) for k in self.factors]
            tags[RUN_COLOR_TAG] = group_color(group, self.groups)
        name = run_name(params, number)
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return TrialLogger(self.client, str(run.info.run_id), run_dir, r0=cfg.adapter.r0,
                           title=figure_title(name, cfg, number))

    def mark_failed(self, run_id: str | None, reason: str) -> None:
        """Close a child run left RUNNING by a worker that died (a stale Optuna trial)."""
        stale = {STALE_TAG: "true"} if reason == STALE_REASON else {}
        self._close_running(run_id, "FAILED", {"state": "FAIL", "fail_reason": reason, **stale})

    def close_told(self, run_id: str | None, state: str, told: datetime | None = None) -> None:
        """Close a child run left RUNNING after Optuna was told its trial ended ``state`` (COMPLETE,
        PRUNED): its worker stopped between the tell and the end of the run (the run is ended after
        the tell, study/trial.OpenRuns), so its last metrics or artifacts may be missing; the tag
        ``dora_lab.closed_at_study_end`` says so.  A run whose worker may still be ending it (another
        invocation on the same study: its process alive on this host, or on another host told less
        than :data:`TOLD_GRACE_S` ago) is left to that worker."""
        self._close_running(run_id, "FINISHED", {"state": state, CLOSED_TAG: "true"},
                            spare=lambda run: worker_may_still_end(run.data.tags.get(WORKER_TAG, ""), told))

    def _close_running(self, run_id: str | None, status: str, tags: Mapping[str, str],
                       spare: Callable[[Run], bool] = lambda run: False) -> None:
        if not run_id:
            return
        try:
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING" and not spare(run):
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                self.client.set_terminated(run_id, status)
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
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED)):
            self.close_told(t.user_attrs.get("mlflow_run_id"), t.state.name, t.datetime_complete)
        folder.mkdir(parents=True, exist_ok=True)
        write_table(rows, folder / "trials.csv", folder / "trials.md")
        notes = plots.study_plots(study, folder / "plots", target_name=metric)
        (folder / "plots" / "NOTES.txt").write_text("".join(f"{k}: {v}\n" for k, v in notes.items()) or "all drawn\n")
        counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
        step = len(rows)
        metrics = [Metric(f"n_{k.lower()}", v, now_ms(), step) for k, v in counts.items()]
        tags = {"n_trials": str(len(rows)), "optuna.metric": metric,
                "optuna.direction": ",".join(d.name.lower() for d in study.directions), **front.answer_tags(study)}
        front.pareto_figure(study, folder / "plots")
        front.mark_front(self.client, study)
        self.client.log_batch(parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.log_artifacts(parent_id, str(folder), "summary")
        self.client.set_terminated(parent_id, status)
        return rows


def worker_may_still_end(worker: str, told: datetime | None, now: datetime | None = None) -> bool:
    """Whether the process ``worker`` (``host:pid``, the run's :data:`WORKER_TAG`) may still be ending
    a run whose trial was told at ``told``: on this host, while that process (not this one) is alive;
    on another host (or no tag), for :data:`TOLD_GRACE_S` after the tell."""
    host, _, pid = worker.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return int(pid) != os.getpid() and _process_alive(int(pid))
    if told is None:
        return False
    return ((now or datetime.now()) - told).total_seconds() < TOLD_GRACE_S


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _reason(t: optuna.trial.FrozenTrial) -> str:
    if t.state == optuna.trial.TrialState.FAIL:
        return str(t.user_attrs.get("fail_reason") or STALE_REASON)  # or a trial failed by an older dora_lab
    if t.state == optuna.trial.TrialState.PRUNED:
        return str(t.user_attrs.get("prune_reason", "pruned"))
    return ""


def trial_minutes(t: optuna.trial.FrozenTrial) -> float | None:
    """The trial's one duration: its run's ``minutes`` (metrics.json,
    :attr:`~dora_lab.run.callbacks.RunResult.minutes`, also the MLflow metric), else (a trial that stopped before its run ended) Optuna's start to end, both
    in minutes to 2 decimals.  MLflow's own Duration column counts the whole trial (loading the
    model, logging), so it reads a little longer."""
    run_dir = t.user_attrs.get("run_dir")
    metrics = Path(str(run_dir)) / "metrics.json" if run_dir else None
    if metrics is not None and metrics.is_file():
        with contextlib.suppress(ValueError, OSError):
            minutes = json.loads(metrics.read_text()).get("minutes")
            if minutes is not None:
                return round(float(minutes), 2)
    if t.datetime_complete and t.datetime_start:
        return round((t.datetime_complete - t.datetime_start).total_seconds() / 60, 2)
    return None


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value (the first objective's), whether it is on the Pareto
    front (a multi-objective study), the searched values, size, minutes, reason."""
    rows = []
    multi = front.is_multi_study(study)
    on_front = set(front.front_numbers(study)) if multi else set()
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "trial": t.number, "state": t.state.name, "value": front.first_value(t),
            **({"pareto": t.number in on_front if t.state == optuna.trial.TrialState.COMPLETE else None}
               if multi else {}),
            **{k: v for k, v in t.params.items()},
            "components": t.user_attrs.get("active_components"),
            "adapter_params": t.user_attrs.get("adapter_parameters"),
            "minutes": trial_minutes(t),
            "reason": _reason(t), "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
        })
    return rows
