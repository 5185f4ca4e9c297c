"""Trials on a shared storage: grid points claimed once, lost trials recovered, heartbeats kept.

Several processes (``--workers``, or the same command on many machines) may run one study.  This
module is the runner's only code on Optuna's private API (a trial's ``_trial_id``, a queued
trial's ``fixed_params``) or on the storage's lock for grids:

- :func:`claim_grid_point`: a grid trial is created only together with its point, chosen and
  queued under the storage's lock (:func:`~dora_lab.track.locks.store_lock`), so no point runs twice
  and no trial exists that has no point to run;
- :func:`trials_to_run`: how many trials this invocation runs (for a grid: the free points);
- a point whose trial was interrupted (Ctrl-C, SIGTERM) or left RUNNING by a dead worker (marked
  FAIL by :func:`fail_stale`, with its ``fail_reason``, once its heartbeat is older than
  ``study.grace_period``) is free again; its new trial carries ``retry_of``;
- :func:`heartbeat`: the running trial's heartbeat, recorded as ``study.optimize`` would; a beat that
  fails is tried again, two failures in a row are one ``warning:`` a trial;
- :func:`tell`: a trial's end, or a warning that its result is discarded when another worker
  marked it stale meanwhile and took over its point; either way the trial as Optuna kept it, whose
  state its MLflow run then ends with (told first, so the two records never disagree).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

from ..plan.space import StudyConfig
from ..track.locks import store_lock
from ..track.stores import store_failure
from ..track.tracker import STALE_REASON

__all__ = ["RETRYABLE_REASONS", "claim_grid_point", "fail_stale", "heartbeat", "tell", "trials_to_run"]


#: the ``fail_reason`` of a trial marked FAIL because its heartbeat stopped (its process was killed)
#: the ``fail_reason`` beginnings of trials that failed for no fault of their own: their grid points run again
RETRYABLE_REASONS = ("interrupted", "terminated", STALE_REASON)


def fail_stale(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose heartbeat is older than the grace period, each with
    ``fail_reason`` :data:`STALE_REASON` in Optuna (as its MLflow run gets from the storage's stale
    callback, which runs after).  ``optuna.storages.fail_stale_trials`` does the same minus the
    reason, and a finished trial's attrs can no longer be set: so the reason is set first, here."""
    if not isinstance(study._storage, BaseHeartbeat) or not is_heartbeat_enabled(study._storage):
        return
    storage: Any = study._storage  # Optuna's storage API too (typed apart from BaseHeartbeat)
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another process failed it first
            storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
            if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(trial_id)
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed if callback is not None else []:
        callback(study, copy.deepcopy(storage.get_trial(trial_id)))


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
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
        failures = 0  # in a row
        while True:
            # a beat that fails (a busy SQLite's "database is locked", a full disk) is tried again at
            # the next interval; two in a row are said once a trial, no thread traceback
            try:
                storage.record_heartbeat(trial_id)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 2:
                    _heartbeat_warning(trial, interval, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _heartbeat_warning(trial: optuna.Trial, interval: int, exc: Exception) -> None:
    """Said once a trial, at its second failed beat in a row: what it risks if the store stays busy."""
    store = store_failure(exc)  # the database's own words ("database is locked"), not Optuna's wrapper
    problem = store[1] if store else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(f"warning: trial {trial.number}: its heartbeat failed twice in a row ({problem}); retrying every "
          f"{interval} s.  If it keeps failing for study.grace_period (default twice the interval), another "
          f"worker marks this trial stale and runs its point again, and this trial's result is discarded",
          file=sys.stderr, flush=True)


def tell(study: optuna.Study, trial: optuna.Trial, values: float | Sequence[float] | None = None,
         state: optuna.trial.TrialState | None = None) -> optuna.trial.FrozenTrial:
    """``study.tell``, unless another process marked the trial FAIL as stale meanwhile (its heartbeat
    stopped for ``study.grace_period``: a busy store, a paused machine) and so freed its point for
    another worker: then its result is discarded with a warning, and the study goes on (Optuna
    refuses to tell a FAIL trial, which stopped the worker).  Returns the trial as Optuna kept it,
    the state its MLflow run must end with (:meth:`~dora_lab.study.trial.OpenRuns.close`)."""
    try:
        return study.tell(trial, values, state=state)
    except ValueError:
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state != optuna.trial.TrialState.FAIL or frozen.user_attrs.get("fail_reason") != STALE_REASON:
            raise
        print(f"warning: trial {trial.number}: its result was discarded: another worker marked it stale (its "
              f"heartbeat was older than study.grace_period) and took over its point", file=sys.stderr, flush=True)
        return frozen


def _retryable(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that failed for no fault of its own: interrupted, or left behind by a dead worker."""
    reason = str(t.user_attrs.get("fail_reason", ""))
    return t.state == optuna.trial.TrialState.FAIL and (not reason or reason.startswith(RETRYABLE_REASONS))


def _point(t: optuna.trial.FrozenTrial, keys: Sequence[str]) -> tuple[Any, ...]:
    """The grid point a trial holds: its queued ``fixed_params`` under the values it has suggested so
    far.  A running trial between its first and last ``suggest`` has only some params; read from
    them alone, its point looked free and a second worker ran it again (5 trials of a 4-point grid)."""
    values = {**t.system_attrs.get("fixed_params", {}), **t.params}
    return tuple(values.get(k) for k in keys)


def _grid_state(config: StudyConfig, trials: Sequence[optuna.trial.FrozenTrial]
                ) -> tuple[list[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """(the grid's points in order, the points a trial holds: queued, running or finished, except
    a trial interrupted or left by a dead worker, whose point is free to run again)."""
    keys = sorted(config.space)
    grid = config.grid()
    points = list(dict.fromkeys(itertools.product(*(grid[k] for k in keys))))
    return points, {_point(t, keys) for t in trials if not _retryable(t)}


def trials_to_run(config: StudyConfig, study: optuna.Study) -> int | None:
    """This invocation's trial count.  For a grid: the points no trial holds, at most n_trials."""
    n = config.n_trials
    if config.sampler.name != "grid":
        return n
    points, taken = _grid_state(config, study.get_trials(deepcopy=False))
    left = len([p for p in points if p not in taken])  # points dropped from the grid do not count
    return left if n is None else min(n, left)


def claim_grid_point(config: StudyConfig, study: optuna.Study, storage: str) -> optuna.Trial | None:
    """The next grid trial, or ``None`` when every point is held.  Choosing the point and creating
    its trial happen in one step under the lock of ``storage`` (the study's storage URL), so two
    processes never take one point and no trial is ever created that has no point to run (what made
    the duplicate PRUNED trials)."""
    keys = sorted(config.space)
    with store_lock(storage, f"optuna:{study.study_name}"):
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
            points, taken = _grid_state(config, trials)
            free = [p for p in points if p not in taken]
            if not free:
                return None
            retry = [t.number for t in trials if _retryable(t) and _point(t, keys) == free[0]]
            study.enqueue_trial(dict(zip(keys, free[0], strict=True)),
                                user_attrs={"retry_of": retry[-1]} if retry else None)
            return study.ask()  # pops the trial just queued: no other is waiting
