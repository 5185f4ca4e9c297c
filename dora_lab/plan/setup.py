"""A study file read as the study CLI reads it: the ``study:`` block checked against the run config it
tunes (every searched or overridden key a key of :class:`~dora_lab.run.config.RunConfig`, every bound
or choice fitting that key, scorer and schedule names registered, searched scorer hyper-parameters
taken by every scorer a trial may use), a trial's config, and :func:`prepare`: everything a study
needs, resolved once into a :class:`StudySetup`.  The block's schema is :mod:`dora_lab.plan.space`.

Both the study runner and the reports read a study file through :func:`prepare`, so both resolve
its config, ``--set`` overrides and defaults the same way.  Errors are
:class:`~dora_lab.run.config_yaml.ConfigError` with the dotted path (``study.sampler.n_startup_trials``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..run.config import RunConfig, field_at, load_config_dict
from ..run.config_yaml import ConfigError, apply_overrides, parse_assignment, read_yaml, set_values
from ..run.names import check_name
from ..run.tasks import get_task
from .objectives import check_direction, resolve
from .space import CategoricalParam, FloatParam, IntParam, StudyConfig

__all__ = ["StudySetup", "check_scorer_params", "parse_study", "prepare", "read_study_block", "trial_config"]


# -- validation against RunConfig ----------------------------------------------------------------
def _field_adapter(path: str) -> TypeAdapter[Any] | None:
    """The type of config key ``path`` (``None`` below a free mapping); ConfigError if unknown."""
    field = field_at(path, hidden=("study",))
    if field is None:
        return None
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        raise ConfigError(f"{path!r} is a section; search or override its keys ({path}.<key>)")
    typ: Any = Annotated[ann, *field.metadata] if field.metadata else ann
    return TypeAdapter(typ)


def _check_value(where: str, path: str, value: Any) -> None:
    adapter = _field_adapter(path)
    if adapter is None:
        return
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ConfigError(f"{where}: {value!r} does not fit config key {path!r}: {msg}") from None


def _check_space(study: StudyConfig, plugins: list[str]) -> None:
    from ..core import registry, schedules, scorers

    try:
        registry.import_plugins(plugins)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    registered = {"scorer.name": scorers.list_scorers(), "schedule.name": schedules.list_schedules()}
    for key, value in study.overrides.items():
        _check_value(f"study.overrides.{key}", key, value)
    for key, param in study.space.items():
        where = f"study.space.{key}"
        values = param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]
        for value in values:
            _check_value(where, key, value)
        if isinstance(param, FloatParam):
            adapter = _field_adapter(key)
            if adapter is not None and type(adapter.validate_python(float(param.low))) is int:
                raise ConfigError(f"{where}: {key!r} takes integers; use type: int")
        for value in _inside(param):
            _check_value(where, key, value)
        if key in registered:
            unknown = [c for c in values if c not in registered[key]]
            if unknown:
                raise ConfigError(f"{where}: unknown {key.split('.')[0]}(s) {unknown}; registered: "
                                  f"{', '.join(registered[key])} (add one with a plugin, config key 'plugins')")


def _inside(param: FloatParam | IntParam | CategoricalParam) -> list[float]:
    """Values a float search samples between its bounds (nine, or each step's up to 100), checked too:
    a key may refuse some (``schedule.warmup`` from 0.5 to 3 would sample fractional step counts)."""
    if not isinstance(param, FloatParam):
        return []
    step = param.step or (param.high - param.low) / 10
    count = min(100, int((param.high - param.low) / step)) if step > 0 else 0
    return [param.low + k * step for k in range(1, count)]


def check_scorer_params(study: StudyConfig, base_scorer: str) -> None:
    """Refuse, before the first trial, a searched ``scorer.params.<key>`` that a scorer the trials
    may use does not take (every trial of that scorer would fail on it).

    The scorers are the choices of a searched ``scorer.name``, else the base config's scorer.  Only
    searched keys need this check: ``scorer.params`` set in the base config, ``study.overrides`` or
    ``--set`` are validated with the base scorer, and a sampled ``scorer.name`` of another scorer
    drops them (the ``--set`` rule), while searched keys are applied after the name."""
    from ..core import scorers

    searched = [k for k in study.space if k.startswith("scorer.params.")]
    name_param = study.space.get("scorer.name")
    names = [str(c) for c in name_param.choices] if isinstance(name_param, CategoricalParam) else [base_scorer]
    for name in dict.fromkeys(names):
        accepted = scorers.get_scorer(name).hyperparameters()
        for key in searched:
            param = key.removeprefix("scorer.params.")
            if param not in accepted:
                takes = ", ".join(f"{k} (default {v})" for k, v in accepted.items()) or "none"
                which = "one of study.space.scorer.name's choices" if name_param is not None else "the base config's"
                raise ConfigError(
                    f"study.space.{key}: scorer {name!r} ({which}) has no hyper-parameter {param!r}; it takes: "
                    f"{takes}.  Every trial of {name!r} would fail: search only parameters every searched "
                    f"scorer takes, or give each scorer its own study")


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # drop the discriminator tag pydantic puts in the path (space.train.lr.float.low)
        if len(loc) > 2 and loc[0] == "space" and loc[2] in ("float", "int", "categorical"):
            del loc[2]
        if len(loc) > 1 and loc[0] in ("sampler", "pruner") and loc[1] in ("tpe", "random", "grid", "median",
                                                                           "hyperband", "none"):
            del loc[1]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_not_found" and loc[0] == "space":
            msg = "a searched key needs type: float, int or categorical"
        elif err["type"] == "union_tag_not_found":
            msg = "needs a name"
        lines.append(f"  {'.'.join(['study', *loc])}: {msg}")
    return "invalid study block:\n" + "\n".join(lines)


def parse_study(data: Mapping[str, Any] | None, plugins: Sequence[str] = ()) -> StudyConfig:
    """Validate a ``study:`` block (``None``: the defaults, an empty space)."""
    try:
        study = StudyConfig.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None
    _check_space(study, list(plugins))
    return study


def read_study_block(path: str | Path) -> dict[str, Any] | None:
    """The ``study:`` block of ``path`` and its ``base:`` files (:func:`~dora_lab.run.config_yaml.read_yaml`,
    the one reader of the chain: ``space``, ``sampler`` and ``pruner`` given in a file *replace*
    its base's, ``overrides`` merge by key); ``None`` if there is none."""
    block = read_yaml(path).get("study")
    return block if isinstance(block, dict) else None


# -- one trial ------------------------------------------------------------------------------------
def trial_config(base: Mapping[str, Any], study: StudyConfig, params: Mapping[str, Any],
                 cli: Mapping[str, Any] | None = None) -> RunConfig:
    """A trial's config: ``base`` (no study block) <- study.overrides <- the CLI's ``--set`` values
    (so the command line wins over the study file) <- the sampled ``params``; then validated."""
    data: dict[str, Any] = {k: v for k, v in base.items() if k != "study"}
    for layer in (study.overrides, cli or {}, params):
        data = set_values(data, layer.items())
    return load_config_dict(data)


# -- the whole setup, resolved once ----------------------------------------------------------------
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
    study_dir: Path  # <output_dir>/studies/<name>: a folder per study identity (study_folder) inside
    metric: str

    @property
    def goals(self) -> list[tuple[str, str]]:
        """(metric, direction) per objective: ``study.objectives``, else [(metric, study.direction)]."""
        return resolve(self.study.objectives, self.metric, self.study.direction)


def prepare(config_path: str | Path, overrides: Sequence[str] = ()) -> StudySetup:
    """Read, override and validate everything; :class:`ConfigError` before anything starts."""
    data = apply_overrides(read_yaml(config_path), overrides)  # the study block merged by its own rule
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
    check_scorer_params(study, base.scorer.name)
    if study.seeds is not None:
        try:
            study.seeds.check_report(data.get("report"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    metric = (study.objectives[0].metric if study.objectives else study.metric) or get_task(base.task.name).main_metric
    for i, (name, direction) in enumerate(resolve(study.objectives, metric, study.direction)):
        check_direction(direction, name, f"study.objectives.{i}.direction" if study.objectives else "study.direction")
    output_dir = Path(base.output_dir).resolve()
    name = check_name("study.name" if study.name else "study.name (default: the config file's name)",
                      study.study_name(config_path))
    check_name("study.experiment" if study.experiment else "study.experiment (default: the study's name)",
               study.experiment or name)
    return StudySetup(
        config_path=Path(config_path), overrides=list(overrides), data=data, cli=cli, base=base, study=study,
        name=name, storage=study.storage_url(output_dir), tracking_uri=study.tracking(output_dir),
        output_dir=output_dir, study_dir=output_dir / "studies" / name,
        metric=metric,
    )

