"""What a study optimises: one metric (``study.metric`` / ``study.direction``) or several
(``study.objectives``), and a trial's values for them.

A multi-objective study (Optuna's ``directions``) trades quality against size, e.g.::

    study:
      objectives:
        - {metric: matthews_correlation, direction: maximize}   # evaluated: the first objective
        - {metric: adapter_parameters, direction: minimize}     # the run's final adapter size
      pruner: none

An objective's metric is either one the evaluation measures (the first objective must be one:
reports, the runs table and the ``objective`` metric in MLflow show it) or a quantity of the
finished run (:data:`RUN_QUANTITIES`).  Optuna's answer is a Pareto front (``study.best_trials``:
the trials no other trial beats in every objective) instead of one best trial.  Optuna's pruners
compare one intermediate value per step, so a multi-objective study cannot prune: a pruner other
than ``none`` is refused before anything starts.

Here without Optuna (the study block is validated without it): the :class:`Objective` model,
:func:`resolve` (the study's (metric, direction) list), :func:`trial_values`, and
:func:`pareto_front` (the non-dominated points; the report draws it for any runs, and it agrees
with Optuna's ``best_trials`` on a study's trials).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from ..run.config_yaml import ConfigError

if TYPE_CHECKING:
    from ..run.callbacks import RunResult

__all__ = ["RUN_QUANTITIES", "Objective", "check_direction", "check_objectives", "dominates", "is_multi", "pareto_front", "resolve",
           "run_quantities", "trial_values"]

# a finished run's quantities an objective may name -> the RunResult attribute that holds it
RUN_QUANTITIES = {"adapter_parameters": "adapter_parameters_final", "active_components": "active_components_final"}


class Objective(BaseModel):
    """One entry of ``study.objectives``."""

    model_config = ConfigDict(extra="forbid")
    metric: str
    direction: Literal["maximize", "minimize"]


def check_objectives(objectives: Sequence[Objective], metric: str | None, pruner: str) -> None:
    """Refuse (``ValueError``, worded for the study block) what a multi-objective study cannot do."""
    if not objectives:
        return
    if len(objectives) < 2:
        raise ValueError("objectives needs two or more entries; for one, set study.metric and study.direction")
    names = [o.metric for o in objectives]
    if len(set(names)) < len(names):
        raise ValueError(f"objectives names a metric twice: {names}")
    if names[0] in RUN_QUANTITIES:
        raise ValueError(f"the first objective must be a metric the evaluation measures (the task's, e.g. "
                         f"matthews_correlation), not the run quantity {names[0]!r}: reports and the runs "
                         f"table show the first objective; put {names[0]!r} after it")
    if metric is not None:
        raise ValueError(f"set either study.metric ({metric!r}) or study.objectives, not both; the first "
                         "objective is the study's metric")
    if pruner != "none":
        raise ValueError(f"pruner {pruner!r} cannot prune a multi-objective study (Optuna's pruners compare "
                         "one intermediate value per step); set study.pruner: none")


def check_direction(direction: str, metric: str, key: str = "study.direction") -> None:
    """A known metric optimised the wrong way (perplexity maximised) is refused; ``key``: where the
    direction was set (``study.direction``, or an entry of ``study.objectives``)."""
    from ..run.tasks import LOWER_IS_BETTER, METRICS

    plain = metric.rsplit("/", 1)[-1]  # validation_mismatched/accuracy
    known = {m for ms in METRICS.values() for m in ms}
    if plain not in known or (direction == "minimize") == (plain in LOWER_IS_BETTER):
        return
    right = "minimize" if plain in LOWER_IS_BETTER else "maximize"
    raise ConfigError(f"{key} is {direction!r} but the study's metric {metric!r} is better when "
                      f"{'lower' if right == 'minimize' else 'higher'}; set {key}: {right}")


def is_multi(objectives: Sequence[Any]) -> bool:
    return len(objectives) > 1


def resolve(objectives: Sequence[Objective], metric: str, direction: str) -> list[tuple[str, str]]:
    """The study's (metric, direction) pairs: ``study.objectives``, else ``[(metric, direction)]``."""
    return [(o.metric, o.direction) for o in objectives] or [(metric, direction)]


def run_quantities(result: RunResult) -> dict[str, float]:
    """The finished run's :data:`RUN_QUANTITIES` by their objective names."""
    return {name: float(getattr(result, attr)) for name, attr in RUN_QUANTITIES.items()}


def trial_values(goals: Sequence[tuple[str, str]], history: Sequence[Mapping[str, float]],
                 quantities: Mapping[str, float], final: bool, eligible_from: int) -> list[float]:
    """A finished trial's value for each (metric, direction) of ``goals``.  An evaluated metric:
    its last evaluation (``final``) or its best once pruning has ended (the budget met: step
    ``eligible_from`` on); a run quantity: ``quantities[metric]`` (:func:`run_quantities`)."""
    out = []
    for metric, direction in goals:
        if metric in RUN_QUANTITIES:
            out.append(float(quantities[metric]))
            continue
        if metric not in history[-1]:
            measured = ", ".join(k for k in history[-1] if k != "step")
            raise ConfigError(f"study objective {metric!r} is neither measured by the evaluation ({measured}) "
                              f"nor a run quantity ({', '.join(RUN_QUANTITIES)})")
        if final:
            out.append(float(history[-1][metric]))
            continue
        values = [h[metric] for h in history if h["step"] >= eligible_from] or [history[-1][metric]]
        out.append(float(max(values) if direction == "maximize" else min(values)))
    return out


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = [x > y if d == "maximize" else x < y for x, y, d in zip(a, b, directions, strict=True)]
    worse = [x < y if d == "maximize" else x > y for x, y, d in zip(a, b, directions, strict=True)]
    return any(better) and not any(worse)


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """The positions of the points no other point dominates (:func:`dominates`), in input order;
    equal points are all kept.  Quadratic and direct: fronts here have tens of points, not millions."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]
