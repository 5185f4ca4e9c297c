"""A finished study's answer, single- or multi-objective, for its summary and its MLflow parent run.

A single-objective study has one best trial (``best.*`` tags, as before).  A multi-objective one
(``study.objectives``, :mod:`dora_lab.plan.objectives`) has a Pareto front, Optuna's
``study.best_trials``: the parent run gets the tags ``pareto.trials`` (their numbers),
``pareto.size`` and ``pareto.objectives``, the figure ``summary/plots/pareto_front.png`` (the first
objective against the second, the front drawn), and every COMPLETE child run the tag
``dora_lab.pareto`` = ``true`` or ``false``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import plots

__all__ = ["FRONT_TAG", "answer_tags", "first_value", "front_lines", "front_numbers", "is_multi_study", "mark_front",
           "pareto_figure"]

FRONT_TAG = "dora_lab.pareto"  # on a multi-objective study's COMPLETE child runs: "true" / "false"
FIGURE = "pareto_front.png"


def is_multi_study(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def first_value(t: optuna.trial.FrozenTrial) -> float | None:
    """The trial's value, or its first objective's in a multi-objective study (``None``: no value)."""
    return t.values[0] if t.values else None


def front_numbers(study: optuna.Study) -> list[int]:
    """The trial numbers on the Pareto front (Optuna's ``best_trials``), ascending."""
    return sorted(t.number for t in study.best_trials)


def _names(study: optuna.Study) -> list[str]:
    return list(study.metric_names or [f"objective {i}" for i in range(len(study.directions))])


def answer_tags(study: optuna.Study) -> dict[str, str]:
    """The parent run's tags for the study's answer: ``best.*`` (its number, value, run and searched
    values) for one objective; ``pareto.*`` for several; nothing before a trial is COMPLETE."""
    if not [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]:
        return {}
    if not is_multi_study(study):
        best = study.best_trial
        return {"best.trial": str(best.number), "best.value": f"{best.value:.6g}",
                "best.mlflow_run_id": str(best.user_attrs.get("mlflow_run_id", "")),
                **{f"best.{k}": str(v) for k, v in best.params.items()}}
    goals = [f"{d.name.lower()} {n}" for n, d in zip(_names(study), study.directions, strict=True)]
    numbers = front_numbers(study)
    return {"pareto.trials": " ".join(map(str, numbers)), "pareto.size": str(len(numbers)),
            "pareto.objectives": ", ".join(goals), "pareto.figure": f"summary/plots/{FIGURE}"}


def mark_front(client: MlflowClient, study: optuna.Study) -> None:
    """Tag every COMPLETE child run of a multi-objective study ``dora_lab.pareto`` = true / false."""
    if not is_multi_study(study):
        return
    front = set(front_numbers(study))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:  # a run deleted by hand must not fail the summary
            with contextlib.suppress(MlflowException):
                client.set_tag(str(run_id), FRONT_TAG, "true" if t.number in front else "false")


def pareto_figure(study: optuna.Study, folder: Path) -> Path | None:
    """The first objective (y) against the second (x) over the COMPLETE trials, the front drawn
    and labelled with the trial numbers; ``None`` for a single-objective study or no trial."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not is_multi_study(study) or not complete:
        return None
    names, front = _names(study), set(front_numbers(study))
    points = [(float(t.values[1]), float(t.values[0])) for t in complete]
    on = [i for i, t in enumerate(complete) if t.number in front]
    return plots.pareto_plot(points, on, folder / FIGURE, xlabel=names[1], ylabel=names[0],
                             maximize_y=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE,
                             labels=[f"t{complete[i].number}" for i in on],
                             title=f"study {study.study_name}: Pareto front over {len(complete)} trials")


def front_lines(study: optuna.Study, goals: Sequence[tuple[str, str]]) -> list[str]:
    """The terminal's lines for the study's answer: the best trial, or the Pareto front's trials."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    if not is_multi_study(study):
        best = study.best_trial
        return [f"best: trial {best.number}, {goals[0][0]} = {best.value:.4f}, "
                f"{', '.join(f'{k}={v}' for k, v in best.params.items())}\n      run folder "
                f"{best.user_attrs.get('run_dir')}"]
    lines = [f"Pareto front ({', '.join(f'{d} {m}' for m, d in goals)}): {len(study.best_trials)} of "
             f"{len(complete)} complete trials"]
    for t in sorted(study.best_trials, key=lambda t: t.values[1]):
        values = ", ".join(f"{m} = {_show(v)}" for (m, _), v in zip(goals, t.values, strict=True))
        params = ", ".join(f"{k}={v}" for k, v in t.params.items())
        lines.append(f"  trial {t.number}: {values}  ({params})")
    return lines


def _show(v: Any) -> str:
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 100 else f"{v:.4f}"
