"""Budget schedules: how many components (or parameters) may be active at step ``t``.

A schedule is a pure function of the decay progress ``p`` in [0, 1] and the start and target
budgets.  The same curve serves a growing method (``grows=True``: start below target; the
built-ins' formulas then rise, e.g. ``dora`` adds ``int((N_T - N) p^3)``).  :class:`BudgetSchedule` wraps it with the phases every schedule shares
(docs/algorithms.md section 3)::

    t in [0, t_i)              warm-up: no pruning, budget = start
    t in [t_i, T - t_f]        decay:   p = (t - t_i) / (T - t_i - t_f); soft prune every
                                        ``interval`` steps (counted from t_i) and at t = T - t_f
    t = T - t_f                the last pruning step: the budget reaches the target exactly and
                                        the mask is frozen
    t in (T - t_f, T)          final:   mask frozen, pruned components gone

Add one with::

    @register_schedule("cosine")
    def cosine(p: float, start: int, target: int) -> int:
        return target + int((start - target) * (1 + math.cos(math.pi * p)) / 2)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .registry import Registry, RegistryError

__all__ = [
    "DEFAULT_FINAL",
    "DEFAULT_INTERVAL",
    "DEFAULT_WARMUP",
    "BudgetSchedule",
    "ScheduleFn",
    "check_lengths",
    "check_phases",
    "fraction_or_steps",
    "get_schedule",
    "list_schedules",
    "phase_steps",
    "register_schedule",
    "resolve_steps",
]

ScheduleFn = Callable[[float, int, int], int]
Phase = Literal["warmup", "decay", "final"]


def _check(name: str, obj: object) -> None:
    if not callable(obj):
        raise RegistryError(f"schedule {name!r} must be a function (p, start, target) -> int")
    params = list(inspect.signature(obj).parameters)
    if len(params) != 3:
        raise RegistryError(
            f"schedule {name!r} must take exactly (p, start, target); it takes ({', '.join(params)})"
        )


SCHEDULES: Registry[ScheduleFn] = Registry("schedule", "dora_lab.schedules", _check)


def register_schedule(name: str, *, prunes: bool = True, replace: bool = False) -> Callable[[ScheduleFn], ScheduleFn]:
    """Register ``fn(p, start, target) -> active budget``.  ``prunes=False`` marks a schedule that
    never prunes (``constant``): no scores are computed and no mask is ever applied."""

    def decorate(fn: ScheduleFn) -> ScheduleFn:
        fn.prunes = prunes  # type: ignore[attr-defined]
        SCHEDULES.add(name, fn, replace=replace)
        return fn

    return decorate


def get_schedule(name: str) -> ScheduleFn:
    return SCHEDULES.get(name)


def list_schedules() -> list[str]:
    return SCHEDULES.names()


# -- the built-ins --------------------------------------------------------------------------------
@register_schedule("dora")
def dora(p: float, start: int, target: int) -> int:
    """DoRA's cubic: slow early, fast late.  Pruned count ``int((N - N_T) p^3)``."""
    return start - int((start - target) * p**3)


@register_schedule("adalora")
def adalora(p: float, start: int, target: int) -> int:
    """AdaLoRA's cubic: fast early, slow late.  ``N_T + int((N - N_T)(1 - p)^3)``."""
    return target + int((start - target) * (1 - p) ** 3)


@register_schedule("linear")
def linear(p: float, start: int, target: int) -> int:
    return start - int((start - target) * p)


@register_schedule("constant", prunes=False)
def constant(p: float, start: int, target: int) -> int:
    """No pruning: plain LoRA at the start rank (the baseline)."""
    return start


# -- the shared phases: their defaults, their rules and their length in steps (one home each) -------
#: ``t_i``, ``t_f`` (config ``schedule.warmup`` / ``schedule.final``: fractions of the run's steps) and
#: the steps between prune decisions (``schedule.interval``), when the config or the caller says nothing
DEFAULT_WARMUP = 0.15
DEFAULT_FINAL = 0.5
DEFAULT_INTERVAL = 100


def fraction_or_steps(value: float) -> float:
    """One phase length must be a fraction of the steps (below 1) or a whole number of steps, never
    1.5 steps; returns it unchanged, else ``ValueError`` saying what to write."""
    if value >= 1 and value != int(value):
        raise ValueError(f"{value:g} is neither a fraction of the steps (below 1, e.g. {DEFAULT_WARMUP}) nor a whole "
                         f"number of optimizer steps: write {int(value)} or {int(value) + 1} steps, or a fraction")
    return value


def resolve_steps(value: float, total_steps: int) -> int:
    """A warm-up/final length: a value below 1 is a fraction of ``total_steps``, else a step count."""
    if value < 0:
        raise ValueError(f"a schedule length cannot be negative, got {value}")
    return int(round(value * total_steps)) if value < 1 else int(value)


def phase_steps(warmup: float, final: float, total_steps: int) -> tuple[int, int]:
    """``(t_i, t_f)`` in steps for a run of ``total_steps``: the one conversion the controller, the
    config's check and the logged settings share."""
    return resolve_steps(warmup, total_steps), resolve_steps(final, total_steps)


def check_lengths(warmup: float, final: float, total_steps: int | None = None) -> None:
    """The rule for ``schedule.warmup`` and ``schedule.final`` as configured: with the run's length
    unknown, two fractions must sum below 1; with it known, the phases in steps must leave a step to
    prune in (:func:`check_phases`).  ``ValueError`` otherwise."""
    if total_steps is not None:
        check_phases(*phase_steps(warmup, final, total_steps), total_steps)
    elif warmup < 1 and final < 1 and warmup + final >= 1:
        raise ValueError(f"warmup ({warmup}) + final ({final}) >= 1 leaves no steps for pruning; make their sum below 1")


def check_phases(warmup_steps: int, final_steps: int, total_steps: int) -> None:
    """A pruning schedule's warm-up and final phases (in steps) must leave a step to prune in, and
    the final phase at least one step; else ``ValueError``.  The config checks this before a run
    when ``train.max_steps`` fixes the length; :class:`BudgetSchedule` checks it always."""
    if final_steps < 1:
        raise ValueError("schedule.final must leave at least one step with the mask frozen")
    if warmup_steps + final_steps >= total_steps:
        raise ValueError(
            f"schedule warm-up ({warmup_steps} steps) + final ({final_steps} steps) "
            f">= total steps ({total_steps}): no step is left for pruning; shorten them"
        )


@dataclass
class BudgetSchedule:
    """A registered schedule function bound to one run's length and budgets.

    ``start`` and ``target`` are in one unit, components or adapter parameters (the controller
    decides).  ``warmup_steps`` is ``t_i``, ``final_steps`` is ``t_f``.
    """

    name: str
    total_steps: int
    start: int
    target: int
    warmup_steps: int
    final_steps: int
    interval: int = 1
    grows: bool = False  # the budget rises from start to target (a growing method); else it falls
    _fn: ScheduleFn = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._fn = get_schedule(self.name)
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.interval < 1:
            raise ValueError(f"schedule.interval must be >= 1 step, got {self.interval}")
        if self.target > self.start and not self.grows:
            raise ValueError(f"the target budget ({self.target}) is above the start budget ({self.start})")
        if self.grows and self.start > self.target:
            raise ValueError(f"a growing schedule's start budget ({self.start}) is above its cap, the "
                             f"target ({self.target}): lower the start or raise the target")
        if self.target < 0:
            raise ValueError(f"the target budget cannot be negative, got {self.target}")
        if self.prunes:
            check_phases(self.warmup_steps, self.final_steps, self.total_steps)

    @property
    def prunes(self) -> bool:
        return bool(getattr(self._fn, "prunes", True))

    @property
    def end_step(self) -> int:
        """``T - t_f``: the last pruning step, where the mask is frozen."""
        return self.total_steps - self.final_steps

    def progress(self, t: int) -> float:
        """``p = clip((t - t_i) / (T - t_i - t_f), 0, 1)``."""
        span = self.total_steps - self.warmup_steps - self.final_steps
        return min(max((t - self.warmup_steps) / span, 0.0), 1.0)

    def budget(self, t: int) -> int:
        """Active budget allowed at step ``t`` (exactly ``target`` from the last pruning step on)."""
        if not self.prunes:
            return self.start
        if t >= self.end_step:  # exact, even when a curve stops short of the target at p = 1
            return self.target
        value = int(self._fn(self.progress(t), self.start, self.target))
        low, high = min(self.start, self.target), max(self.start, self.target)
        return min(max(value, low), high)

    def phase(self, t: int) -> Phase:
        if not self.prunes or t < self.warmup_steps:
            return "warmup"
        return "decay" if t <= self.end_step else "final"

    def is_prune_step(self, t: int) -> bool:
        """Soft prune every ``interval`` steps from ``t_i``, and always at the last pruning step."""
        if not self.prunes or t < self.warmup_steps or t > self.end_step:
            return False
        return (t - self.warmup_steps) % self.interval == 0 or t == self.end_step

    def is_final_step(self, t: int) -> bool:
        return self.prunes and t == self.end_step

    def curve(self) -> list[int]:
        """The budget at every step ``0 .. T-1`` (for plots)."""
        return [self.budget(t) for t in range(self.total_steps)]
