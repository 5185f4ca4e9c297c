"""Run configuration: YAML (safe loader) -> typed, validated objects.

Everything a run needs is in one :class:`RunConfig`.  A YAML file may name a ``base:`` file
(relative to itself) that it overrides key by key, and ``--set key.path=value`` overrides apply
last (values parsed as YAML: ``--set train.lr=3e-4``, ``--set adapter.targets=[query,value]``).
Every error (an unknown key, a wrong type, an impossible schedule) is a :class:`ConfigError`
whose message names the key's dotted path, raised before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeGuard

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from ..core.adapter.layer import DEFAULT_INIT
from ..core.methods import DEFAULT_METHOD
from ..core.schedules import DEFAULT_FINAL, DEFAULT_INTERVAL, DEFAULT_WARMUP, check_lengths, fraction_or_steps
from .config_data import DatasetConfig
from .config_eval import EvalConfig
from .config_method import check_method, take_method
from .config_yaml import ConfigError, apply_overrides, read_yaml
from .quantization import QuantizationConfig

if TYPE_CHECKING:
    from ..core.controller import PruningController

__all__ = ["AdapterConfig", "BudgetConfig", "MethodConfig", "ModelConfig", "RegularizerConfig", "RunConfig",
           "ScheduleConfig", "ScorerConfig", "TaskConfig", "TrainConfig", "build_controller", "field_at",
           "flatten", "load_config", "load_config_dict"]


class _Strict(BaseModel):
    # allow_inf_nan=False: ``train.epochs: .inf`` or ``train.lr: .nan`` is refused here, not mid-training
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: ``task.max_length``'s default, also the encoders' (run/batching.py) when a caller gives none
DEFAULT_MAX_LENGTH = 128


class TaskConfig(_Strict):
    name: str = Field(
        "cola", description="a registered task (cola, sst2, ..., instruct; docs/configuration.md)")
    data_dir: str | None = Field(None, description="folder with train/validation .jsonl/.csv/.tsv; null = Hub")
    dataset: DatasetConfig | None = Field(None, description="a Hub id or a local data path (docs/decoders.md)")
    max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=8, description="tokens per row; longer rows are truncated (at most the model's)")
    max_train_samples: int | None = Field(
        None, ge=1, description="keep a random subset of this many training rows (same per seed); null: all")
    max_eval_samples: int | None = Field(
        None, ge=1, description="keep a random subset of this many rows of each evaluation split; null: all")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="rename the data's columns to the task's: {instruction: prompt}")
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="causal tasks: the tokenizer's chat template (auto: when it has one) or plain text")


class ModelConfig(_Strict):
    name: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2", description="a Hub model id or a local folder")
    trainable: list[str] = Field(default_factory=lambda: ["classifier", "pooler"],
                                 description="modules trained in full beside the adapters (the task head), "
                                             "by a part of their dotted name")
    device: str = Field(
        "auto", description="a torch device (cpu, cuda, cuda:1); auto: the GPU if any, else cpu")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the forward pass: fp32 (off), bf16, or fp16 (gradient scaler)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="of the frozen base weights; bfloat16 keeps adapters and head in float32 "
                               "and runs the forward pass under bf16 autocast")
    quantization: QuantizationConfig | None = Field(None, description="QLoRA: a 4-bit frozen base (docs/decoders.md)")

    @model_validator(mode="after")
    def _dtype_fits_precision(self) -> ModelConfig:
        if self.dtype == "bfloat16" and self.precision == "fp16":
            raise ValueError("model.dtype bfloat16 runs under bf16 autocast; model.precision fp16 cannot go "
                             "with it: set model.precision to bf16 (or fp32, which then means bf16)")
        return self


class AdapterConfig(_Strict):
    targets: list[str] | str | None = Field(
        None, description="linears to adapt: name suffixes, one regex, or all-linear; null: the model "
                          "family's")
    r0: int = Field(3, ge=1, description="start rank: rank-1 components per adapted matrix before pruning")
    alpha: float = Field(8.0, gt=0, description="the update is scaled by alpha / r0")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout probability on an adapter's input")
    init: Literal["dora", "adalora"] = Field(
        DEFAULT_INIT, description="A, B init: dora (kaiming uniform) or adalora (normal, std 0.02); c starts at 0")


class BudgetConfig(_Strict):
    target_rank: float | None = Field(2.0, ge=0, description="final average active rank per matrix")
    target_params: int | None = Field(None, ge=0, description="final active adapter parameters: 340000 or '0.34M'")

    @field_validator("target_params", mode="before")
    @classmethod
    def _suffixed(cls, value: Any) -> Any:
        """Accept the papers' way of writing budgets: ``"0.34M"``, ``"340k"``."""
        if isinstance(value, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", value)
            if m is None:
                raise ValueError(f"{value!r} is not a parameter count; write 340000, '340k' or '0.34M'")
            scale = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
            return int(round(float(m.group(1)) * scale))
        return value

    @model_validator(mode="after")
    def _one_of(self) -> BudgetConfig:
        if self.target_params is not None and self.target_rank is not None:
            # target_params given explicitly wins over the default target_rank
            object.__setattr__(self, "target_rank", None)
        if self.target_params is None and self.target_rank is None:
            raise ValueError("set budget.target_rank (average rank) or budget.target_params")
        return self


class ScorerConfig(_Strict):
    name: str = Field("magnitude", description="the registered importance scorer (magnitude, sensitivity, "
                                               "smoothed_uncertainty, or a plugin's)")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the scorer's hyper-parameters, e.g. {beta: 0.9}")


class MethodConfig(_Strict):
    name: str = Field(DEFAULT_METHOD, description="the allocation method (docs/methods.md); dora = scorer x schedule")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the method's own parameters, e.g. {start_rank: 1} "
                                               "(docs/methods.md)")


#: A phase length: a fraction of the run's steps (below 1) or a whole number of steps, never 1.5 steps
#: (a type, not a model validator, so that a study's searched and overridden values are checked too).
FractionOrSteps = Annotated[float, AfterValidator(fraction_or_steps)]


class ScheduleConfig(_Strict):
    name: str = Field(
        "dora", description="the budget schedule: dora, adalora, linear, or constant (no pruning)")
    warmup: FractionOrSteps = Field(DEFAULT_WARMUP, ge=0, description="t_i: a fraction of the steps if < 1, else steps")
    final: FractionOrSteps = Field(DEFAULT_FINAL, ge=0, description="t_f: a fraction of the steps if < 1, else steps")
    interval: int = Field(
        DEFAULT_INTERVAL, ge=1, description="optimizer steps between pruning decisions, counted from t_i")
    compact: bool = Field(True, description="when pruning ends, drop pruned components from the weights and "
                                            "the optimizer state")

    @model_validator(mode="after")
    def _phases_fit(self) -> ScheduleConfig:
        check_lengths(self.warmup, self.final)  # the run's length is not known here
        return self


class RegularizerConfig(_Strict):
    name: str | None = Field(
        "dem", description="the regularizer added to the loss: dem, orthogonal; null: none")
    weight: float = Field(0.1, ge=0, description="its coefficient in the training loss")


class TrainConfig(_Strict):
    method: Literal["adapter", "full"] = Field(
        "adapter", description="adapter: train adapters and the head; full: fine-tune every weight "
                               "(no adapters)")
    epochs: float = Field(3.0, gt=0, description="passes over the training rows (may be fractional)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(32, ge=1, description="training rows per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    eval_batch_size: int = Field(128, ge=1, description="rows per evaluation (and generation) batch")
    lr: float = Field(5e-4, gt=0, description="peak AdamW learning rate")
    head_lr: float | None = Field(None, gt=0, description="peak learning rate of the head (model.trainable) "
                                                          "in adapter runs; null: lr")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay (none on biases and LayerNorm weights)")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of the optimizer steps of linear "
                                                              "learning-rate warm-up, then linear decay to 0")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradients' global norm to this; "
                                                               "null: no clipping")
    eval_every: int = Field(100, ge=1, description="evaluate every N optimizer steps (and at the end)")
    group_by_length: bool = Field(
        True, description="training batches of rows of similar length (less padding)")
    divergence_loss: float = Field(1e4, gt=0, description="stop a run whose loss exceeds this or is NaN")
    save_adapter: bool = Field(
        True, description="write the best evaluation's adapter to the run folder's adapter/")
    processes: int = Field(1, ge=1, description="data-parallel processes; > 1 relaunches under torchrun")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, slower steps")
    compile: bool = Field(False, description="the training step under torch.compile (did not pay on a CPU: docs/performance.md)")
    packing: bool = Field(False, description="causal tasks: pack each batch's rows into few sequences (docs/decoders.md)")


class RunConfig(_Strict):
    """One training run, fully resolved."""

    seed: int = Field(0, description="seeds adapter init, dropout, batch order and row subsets")
    output_dir: str = Field("runs", description="folder (from the current one) for runs, studies, reports, "
                                                "optuna.db and mlflow.db")
    plugins: list[str] = Field(default_factory=list,
                               description="modules or .py files (relative to the config) imported first; "
                                           "they register tasks, scorers, schedules")
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    regularizer: RegularizerConfig = Field(default_factory=RegularizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    study: dict[str, Any] | None = Field(None, description="the study block, validated by dora_lab.plan.space")
    report: dict[str, Any] | None = Field(None, description="the report block, read by dora_lab.report (dora_lab.plan.report_block)")

    @model_validator(mode="after")
    def _budget_fits(self) -> RunConfig:
        rank = self.budget.target_rank
        if rank is not None and rank > self.adapter.r0:
            raise ValueError(f"budget.target_rank ({rank}) is above the start rank adapter.r0 ({self.adapter.r0}); "
                             f"the budget can only shrink")
        return self

    def resolved(self) -> dict[str, Any]:
        """The config as plain data (what is saved with every run)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)


def load_config_dict(data: Mapping[str, Any]) -> RunConfig:
    """Validate plain data into a :class:`RunConfig`, with dotted key paths in every error."""
    try:
        cfg = RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                section = _section_model(err["loc"][:-1])
                allowed = ", ".join(section.model_fields) if section else ""
                msg = f"unknown key; allowed here: {allowed}"
            lines.append(f"  {loc}: {msg}" + (f" (got {err['input']!r})" if _show_input(err) else ""))
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None
    _check_registered(cfg)
    return cfg


def _show_input(err: Any) -> bool:
    return err["type"] not in ("extra_forbidden", "missing") and not isinstance(err.get("input"), dict)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    try:
        field = field_at(loc) if loc else None
    except ConfigError:
        return None
    if field is None:
        return RunConfig if not loc else None
    ann = field.annotation
    return ann if _is_model(ann) else None


def _is_model(ann: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def field_at(path: str | Sequence[Any], hidden: Collection[str] = ()) -> FieldInfo | None:
    """The schema of config key ``path`` (dotted, or its parts) in :class:`RunConfig`: its pydantic
    field (a section's ``annotation`` is the section's model), or ``None`` below a free mapping such
    as ``scorer.params.beta`` (the scorer checks those).  The one walker of the config's schema, for
    error messages and the study's searched and overridden keys.  An unknown key is a
    :class:`ConfigError` that lists the allowed ones; ``hidden`` top-level keys count as unknown.

    >>> field_at("train.lr").annotation
    <class 'float'>
    """
    parts = path.split(".") if isinstance(path, str) else [str(p) for p in path]
    dotted = ".".join(parts)
    model: type[BaseModel] = RunConfig
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None or (i == 0 and part in hidden):
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(k for k in model.model_fields if i > 0 or k not in hidden)
            raise ConfigError(f"no config key {dotted!r}: {part!r} is not a key of {where} (allowed: {allowed})")
        ann = field.annotation
        if i == len(parts) - 1:
            return field
        if _is_model(ann):
            model = ann
        elif getattr(ann, "__origin__", None) is dict or ann is dict:
            return None
        else:
            raise ConfigError(f"no config key {dotted!r}: {'.'.join(parts[:i + 1])!r} is not a section")
    return None


def _check_registered(cfg: RunConfig) -> None:
    """Task, method, scorer, schedule and regulariser names must be registered (after importing
    plugins), and the method's parameters its own."""
    from ..core import methods, registry, regularizers, schedules, scorers
    from . import tasks

    try:
        registry.import_plugins(cfg.plugins)
        try:
            spec = tasks.get_task(cfg.task.name)
        except ValueError as exc:
            raise ValueError(f"task.name: {exc}") from None
        try:
            method = check_method(cfg.method)  # the run's one build (build_controller takes it)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"method.{'params' if cfg.method.name in methods.METHODS else 'name'}: {exc}") from None
        if method.needs_validation and not spec.eval_splits and cfg.train.method == "adapter":
            raise ValueError(f"method.name: method {cfg.method.name!r} scores components on a validation batch, but "
                             f"task {cfg.task.name!r} has no evaluation split; give the task one (TaskSpec.eval_splits) "
                             f"or pick a method that needs none (dora, sora, increlora, dylora, eva, fisher)")
        start_rank, target_rank = getattr(method, "start_rank", None), cfg.budget.target_rank
        if method.grows and start_rank is not None and target_rank is not None and start_rank > target_rank:
            raise ValueError(f"method.params.start_rank ({start_rank}) is above the cap budget.target_rank "
                             f"({target_rank:g}): a growing method starts below its cap; lower start_rank or "
                             f"raise budget.target_rank")
        scorers.make_scorer(cfg.scorer.name, **cfg.scorer.params)
        schedule = schedules.get_schedule(cfg.schedule.name)
        if (method.grows or method.follows_schedule) and not getattr(schedule, "prunes", True):
            raise ValueError(f"schedule.name: method {cfg.method.name!r} acts at the schedule's prune steps, but "
                             f"schedule {cfg.schedule.name!r} has none: pick dora, adalora or linear")
        total = cfg.train.max_steps
        if total and cfg.train.method == "adapter" and getattr(schedule, "prunes", True):
            s = cfg.schedule
            try:  # known before any data or model is loaded: refuse now, not after loading them
                check_lengths(s.warmup, s.final, total)
            except ValueError as exc:
                raise ValueError(f"schedule.warmup ({s.warmup:g}) and schedule.final ({s.final:g}) do not fit "
                                 f"train.max_steps ({total}): {exc}, or raise train.max_steps") from None
        if cfg.regularizer.name:
            regularizers.get_regularizer(cfg.regularizer.name)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def build_controller(cfg: RunConfig, model: Any, total_steps: int,
                     agree: Callable[[Any], Any] | None = None) -> PruningController:
    """The pruning controller a run config asks for, over ``model``'s adapted layers for
    ``total_steps`` optimizer steps: the one mapping of the ``scorer``, ``schedule``, ``budget`` and
    ``regularizer`` blocks onto :class:`~dora_lab.core.controller.PruningController` (the training loop,
    or a ``DoraTrainerCallback(lambda total: build_controller(cfg, model, total))``).  ``agree``: how
    data-parallel ranks agree on a pruning decision (:func:`dora_lab.run.distributed.agree`).  A schedule
    or budget that does not fit the run's length or model raises :class:`ConfigError`."""
    from ..core.adapter import adapter_layers
    from ..core.controller import PruningController
    from ..core.scorers import make_scorer

    try:
        return PruningController(
            model, make_scorer(cfg.scorer.name, **cfg.scorer.params), cfg.schedule.name, total_steps,
            target_rank=cfg.budget.target_rank, target_params=cfg.budget.target_params,
            warmup=cfg.schedule.warmup, final=cfg.schedule.final, interval=cfg.schedule.interval,
            regularizer=cfg.regularizer.name, reg_weight=cfg.regularizer.weight,
            compact=cfg.schedule.compact, agree=agree,
            method=take_method(cfg.method))
    except ValueError as exc:  # a schedule or budget that does not fit this run's length or model
        raise ConfigError(f"the schedule and budget do not fit this run ({total_steps} optimizer steps, "
                          f"{len(adapter_layers(model))} adapted matrices): {exc}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read ``path`` (or the defaults), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return load_config_dict(apply_overrides(data, overrides))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and Optuna search spaces)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out
