"""Optuna's side of the ``study:`` block: the sampler, the pruner and each trial's values.

:mod:`dora_lab.plan.space` and :mod:`dora_lab.plan.setup` read and check the block without Optuna; this module turns it into
Optuna objects for the runner (:mod:`dora_lab.study.runner`):

- :func:`make_sampler`: TPE and random seeded per trial (:class:`TrialSeeded`), so processes sharing
  a storage never replay each other's draws; a grid whose points the runner claims itself
  (:mod:`dora_lab.study.grid`);
- :func:`make_pruner`: median, hyperband or none;
- :func:`suggest`: a trial's value for every searched key (the distributions);
- :func:`check_space_unchanged`: a categorical whose choices changed within one study, refused
  before any trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from ..plan.space import (
    CategoricalParam,
    FloatParam,
    HyperbandPruner,
    IntParam,
    MedianPruner,
    RandomSampler,
    StudyConfig,
    TPESampler,
)
from ..run.config_yaml import ConfigError

__all__ = ["TrialSeeded", "check_directions", "check_space_unchanged", "make_pruner", "make_sampler", "suggest"]


def suggest(trial: optuna.Trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """Ask the trial for a value of every searched key."""
    values: dict[str, Any] = {}
    for key, p in space.items():
        if isinstance(p, FloatParam):
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            values[key] = trial.suggest_int(key, p.low, p.high, log=p.log, step=p.step)
        else:
            values[key] = trial.suggest_categorical(key, p.choices)
    return values


def check_space_unchanged(config: StudyConfig, study: optuna.Study) -> None:
    """Optuna refuses a categorical whose choices differ from the study's earlier trials (every new
    trial would fail); say so before any trial starts.  Float and int ranges may change."""
    for t in study.get_trials(deepcopy=False):
        for key, dist in t.distributions.items():
            param = config.space.get(key)
            if isinstance(dist, optuna.distributions.CategoricalDistribution) and isinstance(param, CategoricalParam) \
                    and list(dist.choices) != list(param.choices):
                raise ConfigError(
                    f"study.space.{key}: the choices {list(param.choices)} differ from those of the study "
                    f"{study.study_name!r} so far {list(dist.choices)}; Optuna cannot change a categorical within "
                    f"one study.  Start a new one: --set study.name={study.study_name}_v2 (same storage, new trials)")


def check_directions(goals: Sequence[tuple[str, str]], study: optuna.Study) -> None:
    """A stored study keeps its objectives' directions: one opened with others (a single-objective
    study run again with ``study.objectives``, say) is refused, with the fix."""
    stored = [d.name.lower() for d in study.directions]
    wanted = [d for _, d in goals]
    if stored != wanted:
        raise ConfigError(
            f"study {study.study_name!r} was created with the direction(s) {stored}; this config asks for "
            f"{wanted} (study.objectives / study.direction).  Optuna cannot change a study's objectives: start a "
            f"new one, --set study.name={study.study_name}_v2 (same storage, new trials)")


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The sampler.  TPE and random draw trial ``n`` with the seed ``seed + n`` (see
    :class:`TrialSeeded`): reproducible, and two processes on one storage (workers, two identical
    commands started together, a resumed study) never replay each other's draws, since no two
    trials share a number.  A grid's points are claimed in order by the study runner."""
    s = study.sampler
    if isinstance(s, TPESampler):
        tpe = s
        return TrialSeeded(lambda seed: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=tpe.n_startup_trials, multivariate=tpe.multivariate), s.seed)
    if isinstance(s, RandomSampler):
        return TrialSeeded(lambda seed: optuna.samplers.RandomSampler(seed=seed), s.seed)
    return _RunnerGridSampler(study.grid(), seed=s.seed)


class TrialSeeded(optuna.samplers.BaseSampler):
    """A sampler made afresh for every trial with the seed ``seed + trial.number`` (``seed=None``:
    unseeded, made once).  Optuna calls :meth:`before_trial` once the trial exists (its number
    known) and before any value is sampled, relative ones included; TPE and random keep no state
    between trials but their random generator, so nothing else changes."""

    def __init__(self, make: Callable[[int | None], optuna.samplers.BaseSampler], seed: int | None) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._seed is not None:
            self._inner = self._make(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial
                                    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class _RunnerGridSampler(optuna.samplers.GridSampler):
    """A GridSampler that never calls ``study.stop()``.  The study runner claims every grid trial
    with its point's values (queued and asked for under a lock), so this sampler never picks a point;
    the runner alone decides when the grid is done."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        return None


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    p = study.pruner
    if isinstance(p, MedianPruner):
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if isinstance(p, HyperbandPruner):
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=p.max_resource,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()
