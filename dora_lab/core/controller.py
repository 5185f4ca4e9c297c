"""The pruning controller: joins an adapted model, a scorer, a budget schedule and a regulariser.

Call :meth:`PruningController.step` once per optimizer step, after ``optimizer.step()`` and
before ``optimizer.zero_grad()``::

    loss = task_loss + controller.regularization_loss()
    loss.backward(); optimizer.step()
    info = controller.step(optimizer)     # score, maybe prune, maybe freeze + compact
    optimizer.zero_grad()

At a prune step every component of every layer is ranked together and the top ``b(t)`` kept
(:meth:`decide` computes that decision; :meth:`apply` carries it out).  During the decay window
pruning is soft (``c_i = 0``, still trainable); at the last pruning step the mask is frozen and,
with ``compact=True``, the pruned components are dropped from A, B, c and the optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .adapter.inject import adapter_layers
from .adapter.layer import RankOneLinear
from .regularizers import get_regularizer
from .schedules import BudgetSchedule, Phase, get_schedule, resolve_steps
from .scorers import Scorer

__all__ = ["BudgetUnit", "PruningController", "StepInfo"]

BudgetUnit = Literal["components", "parameters"]


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
    """Scores components, applies the schedule's budget, freezes and compacts at the end.

    ``target_rank`` (average active components per layer) or ``target_params`` (active adapter
    parameters, ``sum (d_in + d_out + 1)``) sets the final budget.  ``warmup``/``final`` are
    fractions of ``total_steps`` when below 1, else step counts.  ``agree`` (optional) receives
    every keep-decision before it is applied and returns the one to apply: in a data-parallel run
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
        warmup: float = 0.15,
        final: float = 0.5,
        interval: int = 100,
        regularizer: str | None = None,
        reg_weight: float = 0.0,
        compact: bool = True,
        agree: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.agree = agree
        self.layers = dict(model) if isinstance(model, Mapping) else adapter_layers(model)
        if not self.layers:
            raise ValueError("the model has no adapter layers: call inject_adapters() first")
        if (target_rank is None) == (target_params is None):
            raise ValueError("give exactly one of target_rank or target_params")
        self.unit: BudgetUnit = "components" if target_params is None else "parameters"
        start = sum(self._cost(layer) * layer.rank for layer in self.layers.values())
        target = (
            int(round(target_rank * len(self.layers))) if target_rank is not None else int(target_params or 0)
        )
        self.scorer = scorer
        self.schedule = BudgetSchedule(
            name=schedule,
            total_steps=total_steps,
            start=start,
            target=target if getattr(get_schedule(schedule), "prunes", True) else start,
            warmup_steps=resolve_steps(warmup, total_steps),
            final_steps=resolve_steps(final, total_steps),
            interval=interval,
        )
        self.regularizer = get_regularizer(regularizer) if regularizer else None
        self.reg_weight = float(reg_weight)
        self.compact_at_end = compact
        self.t = 0
        self.frozen = False

    def _cost(self, layer: RankOneLinear) -> int:
        return 1 if self.unit == "components" else layer.params_per_component

    # -- per step -----------------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor:
        """``weight * R`` for the configured regulariser (zero when off)."""
        reg = self.regularizer
        if reg is None or self.reg_weight == 0.0 or (self.frozen and getattr(reg, "stops_when_frozen", False)):
            return torch.zeros(())
        return self.reg_weight * reg(list(self.layers.values()))

    def step(self, optimizer: torch.optim.Optimizer | None = None, *, update_scores: bool = True) -> StepInfo:
        """One optimizer step: update the scores, prune when the schedule says so.

        ``update_scores=False`` advances the schedule without feeding this step's gradients to the
        scorer: for a step that fp16 loss scaling skipped because its gradients overflowed.
        """
        t = self.t
        sched = self.schedule
        pruned = False
        if optimizer is None and self.compact_at_end and sched.prunes and not self.frozen:
            raise ValueError(
                "PruningController.step() needs the optimizer: call controller.step(optimizer) after "
                "optimizer.step().  When pruning ends the adapters are compacted into new, smaller "
                "parameters and the optimizer (and its state) must be moved to them; without an optimizer "
                "build the controller with compact=False."
            )
        if sched.prunes and not self.frozen:
            if update_scores:
                self._check_grads()
                self.scorer.update(self.layers)
            # a prune step whose gradients were skipped (fp16 overflow) before any score exists waits
            # for the next step; the final step always decides (and says so if it cannot)
            waiting = not update_scores and not sched.is_final_step(t) and not self.scorer.scores()
            if sched.is_prune_step(t) and not waiting:
                keep = self.decide(sched.budget(t))
                if self.agree is not None:
                    keep = self.agree(keep)
                self.apply(keep, final=sched.is_final_step(t), optimizer=optimizer)
                pruned = True
        self.t += 1
        return StepInfo(
            step=t,
            phase=sched.phase(t),
            budget=sched.budget(t),
            active_components=sum(layer.active_rank for layer in self.layers.values()),
            active_parameters=sum(layer.active_parameters() for layer in self.layers.values()),
            pruned=pruned,
            frozen=self.frozen,
        )

    def _check_grads(self) -> None:
        """A scorer that says it reads gradients (``needs_grad``) is refused a step without them,
        by name, before it sees ``None`` (a layer with no components has nothing to score)."""
        if not getattr(self.scorer, "needs_grad", False):
            return
        for name, layer in self.layers.items():
            if layer.rank and any(p.grad is None for p in (layer.A, layer.B, layer.c)):
                raise RuntimeError(
                    f"scorer {self.scorer.name!r} needs gradients but layer {name!r} has none: call "
                    f"controller.step() after optimizer.step() and before optimizer.zero_grad()"
                )

    def decide(self, budget: int) -> dict[str, torch.Tensor]:
        """Global top-``budget`` by score: one bool keep-mask per layer (nothing is changed).

        In components every one of the top ``budget`` is kept; in parameters components are
        taken in score order while they fit (a greedy fill), so the active count never exceeds it.
        """
        scores = self.scorer.scores()
        missing = [n for n in self.layers if n not in scores]
        if missing:
            raise RuntimeError(f"scorer {self.scorer.name!r} has no scores for layers {missing[:3]}")
        names = list(self.layers)
        flat = torch.cat([scores[n].float().cpu() for n in names])
        if (flat < 0).any() or not torch.isfinite(flat).all():
            raise ValueError(f"scorer {self.scorer.name!r} returned negative or non-finite scores")
        costs = torch.cat([torch.full((self.layers[n].rank,), self._cost(self.layers[n])) for n in names])
        order = torch.sort(flat, descending=True, stable=True).indices
        keep_flat = torch.zeros_like(flat, dtype=torch.bool)
        if self.unit == "components":
            keep_flat[order[:budget]] = True
        else:
            used = 0
            for i in order.tolist():
                if used + int(costs[i]) <= budget:
                    keep_flat[i] = True
                    used += int(costs[i])
        out, offset = {}, 0
        for n in names:
            r = self.layers[n].rank
            out[n] = keep_flat[offset : offset + r]
            offset += r
        return out

    def apply(self, keep: Mapping[str, torch.Tensor], final: bool = False,
              optimizer: torch.optim.Optimizer | None = None) -> None:
        """Soft-prune to ``keep``; with ``final`` freeze the mask and (if enabled) compact."""
        for name, layer in self.layers.items():
            mask = keep[name].to(layer.mask.device)
            if final:
                layer.freeze_mask(mask)
            else:
                layer.soft_prune(mask)
        if final:
            self.frozen = True
            if self.compact_at_end:
                for layer in self.layers.values():
                    layer.compact(optimizer)

    # -- reporting ----------------------------------------------------------------------------
    def allocation(self) -> dict[str, int]:
        """Active rank of every layer."""
        return {n: layer.active_rank for n, layer in self.layers.items()}

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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore step, masks, compaction and scorer state.  Load this *before* the model's
        weights and the optimizer's state: it shrinks compacted layers to their saved shapes."""
        for name, layer in self.layers.items():
            saved = state["layers"][name]
            if saved["index"].numel() < layer.rank:
                wanted = set(saved["index"].tolist())
                layer.soft_prune(torch.tensor([int(i) in wanted for i in layer.index.tolist()]))
                layer.compact()
            layer.mask.copy_(saved["mask"])
            layer.hard_mask = bool(saved["hard"])
        self.t = int(state["t"])
        self.frozen = bool(state["frozen"])
        self.scorer.load_state_dict(state["scorer"])
