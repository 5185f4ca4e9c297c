"""The pruning controller: joins an adapted model, a scorer, a budget schedule and a regulariser.

Call :meth:`PruningController.step` once per optimizer step, after ``optimizer.step()`` and
before ``optimizer.zero_grad()``::

    loss = task_loss + controller.regularization_loss()
    loss.backward(); optimizer.step()
    info = controller.step(optimizer)     # score, maybe prune, maybe freeze + compact
    optimizer.zero_grad()

What is kept when is the allocation method's (:mod:`dora_lab.core.methods`; default ``dora``, the
scorer x schedule path of ``methods/dora.py``): at its decision steps it returns one keep-mask per
layer and the controller applies it (:meth:`apply`).  The method sees the run through a
:class:`~dora_lab.core.context.MethodContext` the controller builds (the scorer in it only for a
method that declares ``uses_scorer``), never the controller itself.  Under ``dora`` every
component of every layer is ranked together and the top ``b(t)`` kept (:meth:`decide`); during the
decay window pruning is soft (``c_i = 0``, still trainable); at the last pruning step the mask is frozen and, with
``compact=True``, the pruned components are dropped from A, B, c and the optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapter.inject import adapter_layers
from .adapter.layer import RankOneLinear
from .context import BudgetUnit, MethodContext, Pool, Progress
from .methods import AllocationMethod, keep_scored, make_method
from .regularizers import get_regularizer
from .schedules import (
    DEFAULT_FINAL,
    DEFAULT_INTERVAL,
    DEFAULT_WARMUP,
    BudgetSchedule,
    Phase,
    get_schedule,
    phase_steps,
)
from .scorers import Scorer

__all__ = ["PruningController", "StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """What the controller did at one optimizer step."""

    step: int
    phase: Phase
    budget: int  # allowed, in the controller's unit
    active_components: int
    active_parameters: int
    pruned: bool  # a prune decision was applied at this step
    frozen: bool  # the final mask is frozen (from this step on)


class PruningController:
    """Joins the layers, the budget and an allocation method; freezes and compacts at the end.

    ``target_rank`` (average active components per layer) or ``target_params`` (active adapter
    parameters, ``sum (d_in + d_out + 1)``) sets the final budget.  ``warmup``/``final`` are
    fractions of ``total_steps`` when below 1, else step counts.  ``method`` is the allocation
    method (default: ``dora``, the scorer x schedule path).  ``agree`` (optional) receives every
    keep-decision before it is applied and returns the one to apply: in a data-parallel run
    :func:`dora_lab.run.distributed.agree` returns rank 0's, so every rank prunes the same components.
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, RankOneLinear],
        scorer: Scorer,
        schedule: str,
        total_steps: int,
        *,
        target_rank: float | None = None,
        target_params: int | None = None,
        warmup: float = DEFAULT_WARMUP,
        final: float = DEFAULT_FINAL,
        interval: int = DEFAULT_INTERVAL,
        regularizer: str | None = None,
        reg_weight: float = 0.0,
        compact: bool = True,
        agree: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        method: AllocationMethod | None = None,
    ) -> None:
        self.agree = agree
        self.layers = dict(model) if isinstance(model, Mapping) else adapter_layers(model)
        if not self.layers:
            raise ValueError("the model has no adapter layers: call inject_adapters() first")
        if (target_rank is None) == (target_params is None):
            raise ValueError("give exactly one of target_rank or target_params")
        self.unit: BudgetUnit = "components" if target_params is None else "parameters"
        self.method = method if method is not None else make_method()
        target = int(round(target_rank * len(self.layers))) if target_rank is not None else int(target_params or 0)
        # capacity: every stored component, in the unit: the pool's size and the most any cap may be
        pool = Pool.of(self.layers, self.unit, target)
        self.capacity, self.target = pool.capacity, pool.target
        if self.target > self.capacity:
            raise ValueError(f"the target budget ({self.target}) is above the start budget ({self.capacity})")
        start = self.method.start_budget(pool)
        if start > self.capacity:
            raise ValueError(f"method {self.method.name!r} starts at {start}, above the pool's size "
                             f"({self.capacity} in {self.unit}): raise adapter.r0 or lower its start")
        if self.method.grows and start > self.target:
            raise ValueError(f"method {self.method.name!r} grows, but its start budget ({start} {self.unit}) is above "
                             f"its cap, the target ({self.target}): lower its start (method.params) or raise the "
                             f"budget (budget.target_rank / budget.target_params)")
        self.scorer = scorer
        prunes = getattr(get_schedule(schedule), "prunes", True)
        warmup_steps, final_steps = phase_steps(warmup, final, total_steps)
        self.schedule = BudgetSchedule(
            name=schedule,
            total_steps=total_steps,
            start=start,
            target=self.target if prunes else start,
            warmup_steps=warmup_steps,
            final_steps=final_steps,
            interval=interval,
            grows=self.method.grows,
        )
        self.regularizer = get_regularizer(regularizer) if regularizer else None
        self.reg_weight = float(reg_weight)
        self.compact_at_end = compact
        self.progress = Progress()
        # the method's narrow view of the run: the scorer only for a method that reads it
        self.context = MethodContext(self.layers, self.unit, self.capacity, self.target, self.schedule,
                                     self.progress, scorer if self.method.uses_scorer else None)
        self.method.setup(self.context)
        # count every layer's active components once, now (on a GPU each count waits for the device):
        # the layers cache the count until their mask changes, so steps between prune steps need none
        self.active_budget()

    # -- where the run is (the context's Progress: what the method reads) ------------------------
    @property
    def t(self) -> int:
        """The optimizer step the controller is at (the next :meth:`step` sees this one)."""
        return self.progress.step

    @property
    def frozen(self) -> bool:
        """The final mask is frozen (from the last prune step on)."""
        return self.progress.frozen

    @property
    def validation_loss(self) -> Callable[[], float] | None:
        return self.progress.validation_loss

    def set_validation(self, loss: Callable[[], float]) -> None:
        """Give a method that scores on a validation batch (``needs_validation``) its loss: ``loss()``
        returns the model's loss on one fixed validation batch, as the model is now (no gradients)."""
        self.progress.validation_loss = loss

    def cost(self, layer: RankOneLinear) -> int:
        """What one component of ``layer`` costs in the budget's unit (1, or ``d_in + d_out + 1``)."""
        return self.context.cost(layer)

    def active_budget(self) -> int:
        """The active components' cost, in the budget's unit."""
        return self.context.active_budget()

    # -- before training ------------------------------------------------------------------------
    def before_training(self, run_batch: Callable[[Any], Any], batches: Iterable[Any]) -> None:
        """Let the method see ``batches`` before the first optimizer step; a one-shot allocator sets
        its ranks here.  ``run_batch(b)`` runs the model (in eval mode) on batch ``b`` with its labels
        and returns the output: a method that needs no gradients calls it under ``torch.no_grad()``,
        ``fisher`` differentiates its ``.loss``.  Does nothing for methods with ``calibration_batches == 0``."""
        if self.method.calibration_batches > 0:
            self.method.before_training(run_batch, batches)

    # -- per step -----------------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor:
        """``weight * R`` for the configured regulariser (zero when off)."""
        reg = self.regularizer
        if reg is None or self.reg_weight == 0.0 or (self.frozen and getattr(reg, "stops_when_frozen", False)):
            return torch.zeros(())
        return self.reg_weight * reg(list(self.layers.values()))

    def step(self, optimizer: torch.optim.Optimizer | None = None, *, update_scores: bool = True) -> StepInfo:
        """One optimizer step: the method's hooks, and its decision applied when it makes one.

        ``update_scores=False`` advances the schedule without feeding this step's gradients to the
        scorer: for a step that fp16 loss scaling skipped because its gradients overflowed.
        """
        t = self.t
        method = self.method
        pruned = False
        if optimizer is None and self.compact_at_end and method.changes_allocation and not self.frozen:
            raise ValueError(
                "PruningController.step() needs the optimizer: call controller.step(optimizer) after "
                "optimizer.step().  When pruning ends the adapters are compacted into new, smaller "
                "parameters and the optimizer (and its state) must be moved to them; without an optimizer "
                "build the controller with compact=False."
            )
        if method.changes_allocation and not self.frozen:
            method.after_optimizer_step(t, optimizer, update_scores)
            keep = method.decide(t, update_scores)
            if keep is not None:
                if self.agree is not None:
                    keep = self.agree(keep)
                self.apply(keep, final=method.is_final(t), optimizer=optimizer)
                method.after_apply(t, keep)
                pruned = True
        elif self.frozen and method.acts_after_freeze:  # e.g. SoRA's proximal step on the kept gates
            method.after_optimizer_step(t, optimizer, update_scores)
        self.progress.step += 1
        return StepInfo(
            step=t,
            phase=method.phase(t),  # type: ignore[arg-type]
            budget=method.budget(t),
            active_components=sum(layer.active_rank for layer in self.layers.values()),
            active_parameters=sum(layer.active_parameters() for layer in self.layers.values()),
            pruned=pruned,
            frozen=self.frozen,
        )

    def decide(self, budget: int) -> dict[str, torch.Tensor]:
        """Global top-``budget`` by the scorer's scores (:func:`~dora_lab.core.methods.keep_scored`):
        one bool keep-mask per layer; nothing is changed."""
        return keep_scored(self.layers, self.scorer, budget, self.cost)

    def apply(self, keep: Mapping[str, torch.Tensor], final: bool = False,
              optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make ``keep`` the active components; with ``final`` freeze the mask and (if enabled) compact.

        Under a ``pool`` method an inactive component that ``keep`` activates is a fresh one, or a
        promoted reserve (:meth:`RankOneLinear.activate`), and the inactive ones are out of the forward pass (hard
        mask); otherwise pruning is soft (``c = 0``, still trainable)."""
        # new components drawn from a generator seeded by the step: alike on every data-parallel rank
        generator = torch.Generator().manual_seed(1_000_003 + self.t) if self.method.pool else None
        for name, layer in self.layers.items():
            mask = keep[name].to(layer.mask.device)
            if self.method.pool:
                layer.activate(mask.bool() & (layer.mask == 0), optimizer, generator)
            if final:
                layer.freeze_mask(mask)
            else:
                layer.soft_prune(mask)
                layer.hard_mask = layer.hard_mask or self.method.pool
        if final:
            self.progress.frozen = True
            if self.compact_at_end:
                for layer in self.layers.values():
                    layer.compact(optimizer)

    # -- reporting ----------------------------------------------------------------------------
    def allocation(self) -> dict[str, int]:
        """Active rank of every layer."""
        return {n: layer.active_rank for n, layer in self.layers.items()}

    def budget_curve(self) -> list[int]:
        """The method's cap at every step ``0 .. T-1`` (for plots and budget.json)."""
        return [self.method.budget(t) for t in range(self.schedule.total_steps)]

    @property
    def settled(self) -> bool:
        """No allocation change is to come (frozen, or a method that never changes it)."""
        return self.frozen or not self.method.changes_allocation

    def component_scores(self) -> dict[str, list[float]]:
        """Latest score of every original component (by start index), for reports."""
        return {n: s.float().cpu().tolist() for n, s in self.scorer.scores().items()}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "frozen": self.frozen,
            "layers": {
                n: {"mask": layer.mask.clone(), "index": layer.index.clone(), "hard": layer.hard_mask}
                for n, layer in self.layers.items()
            },
            "scorer": self.scorer.state_dict(),
            "method": self.method.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore step, masks, compaction, scorer and method state.  Load this *before* the model's
        weights and the optimizer's state: it shrinks compacted layers to their saved shapes."""
        for name, layer in self.layers.items():
            saved = state["layers"][name]
            if saved["index"].numel() < layer.rank:
                wanted = set(saved["index"].tolist())
                layer.soft_prune(torch.tensor([int(i) in wanted for i in layer.index.tolist()]))
                layer.compact()
            layer.mask.copy_(saved["mask"])
            layer.hard_mask = bool(saved["hard"])
        self.progress.step = int(state["t"])
        self.progress.frozen = bool(state["frozen"])
        self.scorer.load_state_dict(state["scorer"])
        self.method.load_state_dict(state.get("method", {}))
