"""The ``study:`` block of a config: what an Optuna study searches, and how.

A study block sits beside the run config it tunes; every key, with the values
``configs/cola.yaml`` uses (the defaults where the file does not set them)::

    study:
      name: null                 # default: the config file's name (cola)
      experiment: null           # MLflow experiment; default: the study's name
      metric: null               # default: the task's main metric (matthews_correlation for cola)
      direction: maximize
      objective: best            # best: the best evaluation once pruning has ended; final: the last
      objectives: []             # several {metric, direction}: a multi-objective study (Pareto front;
                                 # pruner none); see dora_lab.plan.objectives
      n_trials: 8                # trials per invocation (split over --workers); null: until timeout
      timeout: 840               # seconds after which no new trial starts (null: none)
      sampler: {name: tpe, seed: 0, n_startup_trials: 3}     # or random / grid (all seeded)
      pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 300}   # or hyperband / none
      storage: null              # Optuna storage; default sqlite:///<output_dir>/optuna.db
      tracking_uri: null         # MLflow; default $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
      heartbeat_interval: 10     # seconds between a RUNNING trial's heartbeats (RDB storages)
      grace_period: null         # a RUNNING trial silent this long is marked FAIL (default 2 x heartbeat_interval)
      overrides:                 # dotted key -> value, set in every trial (replaces, like --set)
        train.epochs: 2
      space:                     # dotted config key -> distribution
        train.lr: {type: float, low: 1.5e-3, high: 6.0e-3, log: true}
        adapter.r0: {type: int, low: 3, high: 5}
        schedule.name: {type: categorical, choices: [dora, adalora, linear]}

Every key of ``space`` and ``overrides`` must be a key of :class:`~dora_lab.run.config.RunConfig`
(anything below a free mapping such as ``scorer.params`` is accepted), and every bound or choice
must fit that key's type and limits; scorer and schedule names must be registered, and every
searched ``scorer.params.*`` key must be a hyper-parameter of every scorer a trial may use
(checked by :mod:`dora_lab.plan.setup`, :func:`~dora_lab.plan.setup.check_scorer_params`).  Errors are
:class:`~dora_lab.run.config_yaml.ConfigError` with the dotted path (``study.sampler.n_startup_trials``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..run.config import field_at
from ..run.config_yaml import ConfigError
from .objectives import Objective, check_objectives
from .seed_option import SeedsOption

__all__ = ["CategoricalParam", "FloatParam", "GridSampler", "HyperbandPruner", "IntParam", "MedianPruner", "NoPruner",
           "Param", "Primitive", "RandomSampler", "StudyConfig", "TPESampler", "db_url"]

Primitive = bool | int | float | str | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no .inf bounds, seconds or steps


# -- the search space ---------------------------------------------------------------------------
class FloatParam(_Strict):
    type: Literal["float"] = Field(description="float: a real number between low and high")
    low: float = Field(description="the smallest value (included)")
    high: float = Field(description="the largest value (included)")
    log: bool = Field(False, description="sample on a log scale (low > 0; not with step)")
    step: float | None = Field(None, gt=0, description="sample only low + k * step; null: any value")

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntParam(_Strict):
    type: Literal["int"] = Field(description="int: a whole number between low and high")
    low: int = Field(description="the smallest value (included)")
    high: int = Field(description="the largest value (included)")
    log: bool = Field(False, description="sample on a log scale (low > 0; step must stay 1)")
    step: int = Field(1, ge=1, description="sample only low + k * step")

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self


class CategoricalParam(_Strict):
    type: Literal["categorical"] = Field(description="categorical: one of the listed choices")
    choices: list[Any] = Field(
        min_length=1, description="the values tried: numbers, strings, booleans or null")

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        bad = [c for c in self.choices if c is not None and not isinstance(c, bool | int | float | str)]
        if bad:
            raise ValueError(f"choices must be numbers, strings, booleans or null (Optuna stores them); got {bad}")
        return self


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low ({low}) is above high ({high})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0, got low={low}")
    if log and step is not None:
        raise ValueError("log and step cannot be combined (Optuna samples either on a log scale or on a grid)")


# -- sampler and pruner ---------------------------------------------------------------------------
class _Seeded(_Strict):
    seed: int | None = Field(
        0, description="tpe, random: trial n samples with seed + n, null: unseeded; grid: unused (points "
                       "run in order)")


class TPESampler(_Seeded):
    name: Literal["tpe"]
    n_startup_trials: int = Field(3, ge=0, description="random trials before TPE models the results")
    multivariate: bool = Field(
        True, description="TPE models the searched keys jointly (Optuna's multivariate)")


class RandomSampler(_Seeded):
    name: Literal["random"]


class GridSampler(_Seeded):
    name: Literal["grid"]


class MedianPruner(_Strict):
    name: Literal["median"]
    n_startup_trials: int = Field(2, ge=0, description="complete trials before any pruning")
    n_warmup_steps: int = Field(0, ge=0, description="optimizer steps of a trial before it may be pruned")


class HyperbandPruner(_Strict):
    name: Literal["hyperband"]
    min_resource: int = Field(1, ge=1, description="optimizer steps")
    max_resource: int | Literal["auto"] = Field(
        "auto", description="optimizer steps of a full trial; auto: the largest step the first finished "
                            "trial reported")
    reduction_factor: int = Field(3, ge=2, description="each rung promotes the best 1/reduction_factor")


class NoPruner(_Strict):
    name: Literal["none"]


Sampler = Annotated[TPESampler | RandomSampler | GridSampler, Field(discriminator="name")]
Pruner = Annotated[MedianPruner | HyperbandPruner | NoPruner, Field(discriminator="name")]


class StudyConfig(_Strict):
    """The validated ``study:`` block (see the module docstring for every key)."""

    name: str | None = Field(
        None, description="the Optuna study (and folder) name; null: the config file's name")
    metric: str | None = Field(
        None, description="the evaluation metric optimized; null: the task's main metric")
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="whether a larger metric is better")
    objective: Literal["best", "final"] = Field(
        "best", description="a trial's value: its best evaluation once pruning has ended, or its last one")
    objectives: list[Objective] = Field(default_factory=list, description="several: a multi-objective study")
    n_trials: int | None = Field(
        10, ge=1, description="trials per invocation, split over --workers (a grid: at most its free "
                              "points); null: until study.timeout")
    timeout: float | None = Field(None, gt=0, description="seconds")
    sampler: Sampler = Field(default_factory=lambda: TPESampler(name="tpe"))
    pruner: Pruner = Field(default_factory=lambda: MedianPruner(name="median"))
    storage: str | None = Field(
        None, description="Optuna storage URL; null: a SQLite optuna.db in output_dir")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else a SQLite mlflow.db in "
                          "output_dir")
    experiment: str | None = Field(None, description="MLflow experiment; null: the study's name")
    heartbeat_interval: int | None = Field(10, ge=1, description="seconds; RDB storages only")
    grace_period: int | None = Field(None, ge=1, description="seconds; default 2 x heartbeat_interval")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted key -> value set in every trial (like --set; the CLI's "
                                          "--set wins)")
    space: dict[str, Param] = Field(
        default_factory=dict, description="dotted config key -> the distribution searched (KEY below)")
    seeds: SeedsOption | None = Field(
        None, description="a grid study that plans its seeds from a pilot (Stein's rule; its keys: study.seeds.*); "
                          "null: seeds are searched like any key")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("sampler", "pruner"):  # "sampler: tpe" is short for "sampler: {name: tpe}"
                if isinstance(data.get(key), str):
                    data[key] = {"name": data[key]}
            if isinstance(data.get("space"), dict):
                data["space"] = _dotted(data["space"], lambda k, v: "type" not in v and all(
                    isinstance(x, dict) for x in v.values()))
            if isinstance(data.get("overrides"), dict):
                data["overrides"] = _dotted(data["overrides"], lambda k, v: _is_section(k))
        return data

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if self.sampler.name == "grid":
            if not self.space:
                raise ValueError("sampler grid needs a search space (study.space)")
            bad = [k for k, p in self.space.items() if not isinstance(p, CategoricalParam)]
            if bad:
                raise ValueError(f"sampler grid takes categorical parameters only; make {bad} "
                                 f"{{type: categorical, choices: [...]}}")
            if self.seeds is not None:  # seeds 0 .. max-1 as one int range: the grid holds the running ones
                self.seeds.check_space({k: p.choices for k, p in self.space.items() if isinstance(p, CategoricalParam)})
                self.space[self.seeds.key] = IntParam(type="int", low=0, high=self.seeds.max - 1)
        elif self.seeds is not None:
            raise ValueError("study.seeds plans the seeds of a grid study: set study.sampler: grid")
        elif self.n_trials is None and self.timeout is None:
            raise ValueError("set study.n_trials or study.timeout (or both), or the study never ends")
        check_objectives(self.objectives, self.metric, self.pruner.name)
        if self.objectives:  # the first objective is the study's metric, with its direction
            object.__setattr__(self, "direction", self.objectives[0].direction)
        return self

    # -- resolved settings ------------------------------------------------------------------------
    def study_name(self, config_path: str | Path | None) -> str:
        return self.name or (Path(config_path).stem if config_path else "study")

    def storage_url(self, output_dir: str | Path) -> str:
        return db_url(self.storage or f"sqlite:///{Path(output_dir).resolve() / 'optuna.db'}")

    def tracking(self, output_dir: str | Path) -> str:
        return db_url(self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                      or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}")

    def grid(self) -> dict[str, list[Primitive]]:
        seeds: dict[str, list[Primitive]] = {self.seeds.key: list(range(self.seeds.running))} if self.seeds else {}
        return {k: list(p.choices) for k, p in self.space.items() if isinstance(p, CategoricalParam)} | seeds


def _dotted(tree: dict[str, Any], descend: Any, prefix: str = "") -> dict[str, Any]:
    """Nested keys -> dotted keys where ``descend(key, value)`` says so, so that
    ``--set study.space.train.lr={...}`` (which nests) means the same as the key ``train.lr``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and descend(path, value):
            out.update(_dotted(value, descend, path + "."))
        else:
            out[path] = value
    return out


def _is_section(path: str) -> bool:
    try:
        field = field_at(path)
    except ConfigError:
        return False
    return field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def db_url(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://`` when only psycopg2 is installed (SQLAlchemy 2.1
    made psycopg 3 the default driver; ``pip install dora_lab[postgres]`` brings psycopg2-binary)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url
