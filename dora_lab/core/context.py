"""What an allocation method sees of a run: its narrow, typed context (issue 26).

A method (:mod:`dora_lab.core.methods`) is handed a :class:`MethodContext`, never the controller:
the adapted layers, what one component costs in the budget's unit, the pool's size and the target,
the budget schedule (which also knows the run's length), where the run is (the step, whether the
masks are frozen, the validation loss where the run gave one) and the configured scorer, for a
method that declares ``uses_scorer`` only.  The controller builds it, advances its
:class:`Progress` and applies what the method decides; the method reads this and nothing else, so
the controller and the methods do not import each other.

Before the schedule exists the controller asks a method for its start budget with the
:class:`Pool` alone (the layers, the unit, the pool's size and the target): the schedule is built
from that start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .adapter.layer import RankOneLinear
from .schedules import BudgetSchedule
from .scorers import Scorer

__all__ = ["BudgetUnit", "MethodContext", "Pool", "Progress"]

BudgetUnit = Literal["components", "parameters"]


@dataclass
class Progress:
    """Where the run is: the one mutable part of a context, advanced by the controller only."""

    step: int = 0  # the optimizer step the controller is at (the next one it will see)
    frozen: bool = False  # the final mask is frozen (no decision is to come)
    validation_loss: Callable[[], float] | None = None  # the model's loss on one fixed validation batch


@dataclass(frozen=True)
class Pool:
    """The adapted layers and the budget, in its unit: ``capacity`` is every stored component's
    cost at the start (fixed: compaction shrinks the layers later), ``target`` the final budget."""

    layers: dict[str, RankOneLinear]
    unit: BudgetUnit
    capacity: int
    target: int

    @classmethod
    def of(cls, layers: dict[str, RankOneLinear], unit: BudgetUnit, target: int) -> Pool:
        """The pool of ``layers`` now, its capacity counted in ``unit``."""
        return cls(layers, unit, sum(component_cost(unit, layer) * layer.rank for layer in layers.values()), target)

    def cost(self, layer: RankOneLinear) -> int:
        """What one component of ``layer`` costs in the budget's unit (1, or ``d_in + d_out + 1``)."""
        return component_cost(self.unit, layer)

    def active_budget(self) -> int:
        """The active components' cost now, in the budget's unit."""
        return sum(self.cost(layer) * layer.active_rank for layer in self.layers.values())


def component_cost(unit: BudgetUnit, layer: RankOneLinear) -> int:
    return 1 if unit == "components" else layer.params_per_component


@dataclass(frozen=True)
class MethodContext(Pool):
    """A :class:`Pool` with the budget schedule, the run's :class:`Progress` and, for a method that
    declares ``uses_scorer``, the configured scorer (None for every other method)."""

    schedule: BudgetSchedule
    progress: Progress
    scorer: Scorer | None = None

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def frozen(self) -> bool:
        """The final mask is frozen: the controller calls no hook after this unless the method
        declares ``acts_after_freeze``."""
        return self.progress.frozen

    @property
    def validation_loss(self) -> Callable[[], float] | None:
        """``loss()``: the model's loss on one fixed validation batch, for a method with
        ``needs_validation`` (None until the run sets it: ``controller.set_validation``)."""
        return self.progress.validation_loss
