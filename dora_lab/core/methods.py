"""Allocation methods: the protocol every dynamic-rank method plugs into, and its registry.

A method decides which of each layer's stored components are active.  The
:class:`~dora_lab.core.controller.PruningController` owns the layers, the budget and the step
count, and calls the method's hooks; it has no special case for any method.  The method sees the
run through its :class:`~dora_lab.core.context.MethodContext` (``self.ctx``, handed to
:meth:`AllocationMethod.setup`): the layers, the cost of a component, the pool's size and the
target, the schedule, the step and the freeze, and the scorer only if it declares ``uses_scorer``::

    before training       before_training(run_batch, batches)   an allocator sees a few batches
                                                                 (one-shot EVA, Fisher) and may set ranks
    every optimizer step  after_optimizer_step(t, optimizer)    proximal gate updates (SoRA), scores,
                                                                 the next step's prefix (DyLoRA); after
                                                                 the freeze only if ``acts_after_freeze``
    the same step         decide(t) -> keep masks | None         at prune/grow steps: which components
                                                                 are active from now on (keep AND activate)
                          is_final(t)                            the decision that freezes the masks
                          after_apply(t, keep)                   after the controller applied it

The budget is a cap: :meth:`AllocationMethod.budget` says how much (in the budget's unit,
components or parameters) may be active at step ``t``; the context's ``schedule`` gives the
default (the configured schedule between ``start_budget`` and the target; a method with
``grows = True`` starts below the target and grows to it).  A method with ``pool = True`` keeps
its inactive components out of the forward pass (a hard mask) and turns an inactive one it
activates into a fresh component (:meth:`RankOneLinear.activate`: new ``A`` row and ``B`` column,
``c = 0``, optimizer state zeroed; a reserve the method set, :meth:`RankOneLinear.set_reserve`, is
promoted with its trained ``A``/``B`` instead), so growth needs no new optimizer.  Without ``pool`` a pruned
component only has ``c = 0`` and keeps training until the final mask (DoRA's soft pruning).

Register one with ``@register_method("name")`` on a subclass; its constructor's keyword arguments
are its hyper-parameters (config ``method.params``).  The built-ins are the top-level ``methods``
package, one file each, found by discovery like ``metrics/``; third-party packages use the
entry-point group ``dora_lab.methods``.  :func:`keep_top` (global top-b within a cost budget) and
:func:`keep_where` (keep by a threshold, capped) are the two shared decision rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from .adapter.layer import RankOneLinear
from .context import MethodContext, Pool
from .registry import Registry, RegistryError, build_checked
from .scorers import Scorer

__all__ = [
    "DEFAULT_METHOD",
    "AllocationMethod",
    "Keep",
    "OneShotMethod",
    "get_method",
    "keep_scored",
    "keep_top",
    "keep_where",
    "uniform_prefix",
    "list_methods",
    "make_method",
    "register_method",
]

Keep = dict[str, torch.Tensor]
#: The allocation method a run uses when its config names none (config ``method.name``): its one home.
DEFAULT_METHOD = "dora"


class AllocationMethod:
    """Base class: every hook does nothing, the budget is the context's schedule.

    ``grows``: the method starts at :meth:`start_budget` below the target and its cap grows.
    ``pool``: inactive components are hard-masked and re-initialised when activated.
    ``calibration_batches``: how many training batches :meth:`before_training` wants (0: none).
    ``uses_scorer``: whether the method reads the configured ``scorer`` (only then does its context
    carry it, :meth:`configured_scorer`; shown in progress bars and reports).
    ``follows_schedule``: the method acts at the schedule's prune steps and needs a schedule that has
    them (not ``constant``).
    ``exact_target``: in components the method ends at exactly the target (False: at most, e.g. a
    threshold that leaves fewer).  ``start_rank``: a growing method's active rank per layer at the
    start (the config refuses one above ``budget.target_rank``).  ``needs_validation``: the method
    scores on a validation batch (``self.ctx.validation_loss``, set by ``controller.set_validation``;
    the config refuses such a method for a task without an evaluation split); ``validation_rows``:
    how many rows of the first evaluation batch that loss reads (None: all).  ``acts_after_freeze``:
    :meth:`after_optimizer_step` runs at every optimizer step, also after the masks froze (SoRA's
    proximal step on the gates); otherwise the controller calls no hook once the masks are frozen.
    """

    name: ClassVar[str] = ""
    grows: ClassVar[bool] = False
    pool: ClassVar[bool] = False
    uses_scorer: ClassVar[bool] = False
    follows_schedule: ClassVar[bool] = False
    exact_target: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = False
    acts_after_freeze: ClassVar[bool] = False
    validation_rows: int | None = None
    start_rank: int | None = None
    calibration_batches: int = 0
    ctx: MethodContext

    # -- binding --------------------------------------------------------------------------------
    def start_budget(self, pool: Pool) -> int:
        """The schedule's start, in the budget's unit (default: every stored component)."""
        return pool.capacity

    def setup(self, ctx: MethodContext) -> None:
        """Called once by the controller, after its schedule is built: the method keeps its context."""
        self.ctx = ctx

    @property
    def ctl(self) -> MethodContext:
        """The context under the name methods used before it replaced the controller (issue 26):
        a method written then (``self.ctl.layers``, ``self.ctl.schedule``) reads the same fields."""
        return self.ctx

    @ctl.setter
    def ctl(self, ctx: MethodContext) -> None:
        self.ctx = ctx

    def configured_scorer(self) -> Scorer:
        """The run's scorer, for a method that declares ``uses_scorer`` (no other context has one)."""
        scorer = self.ctx.scorer
        if scorer is None:
            raise RuntimeError(f"method {self.name!r} reads the configured scorer but does not declare "
                               f"uses_scorer = True, so its context has none: declare it on the class")
        return scorer

    def active_keep(self) -> Keep:
        """The active components now, as keep masks (bools on the CPU): a decision's starting point."""
        return {n: layer.mask.cpu() > 0 for n, layer in self.ctx.layers.items()}

    # -- hooks ----------------------------------------------------------------------------------
    def before_training(self, run_batch: Callable[[Any], Any], batches: Iterable[Any]) -> None:
        """Before the first optimizer step: ``run_batch(b)`` runs the model on batch ``b`` (its labels
        included) and returns the output, whose ``.loss`` a method may differentiate."""
        del run_batch, batches

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        """After ``optimizer.step()`` of step ``t``, gradients still present.  ``update_scores`` is
        False for a step that fp16 loss scaling skipped (its gradients overflowed).  After the
        freeze (``self.ctx.frozen``) only for a method with ``acts_after_freeze``."""
        del t, optimizer, update_scores

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        """The active components from now on (one bool mask per layer), or None: no change."""
        del t, update_scores
        return None

    def after_apply(self, t: int, keep: Keep) -> None:
        """After the controller applied step ``t``'s decision ``keep`` (the agreed one)."""
        del t, keep

    def is_final(self, t: int) -> bool:
        """Whether step ``t``'s decision freezes the masks (then the controller compacts)."""
        return self.ctx.schedule.is_final_step(t)

    # -- the cap --------------------------------------------------------------------------------
    @property
    def changes_allocation(self) -> bool:
        """Whether the method ever decides (a constant schedule under ``dora`` does not)."""
        return self.ctx.schedule.prunes

    def budget(self, t: int) -> int:
        """The most that may be active after step ``t``'s decision (the cap)."""
        return self.ctx.schedule.budget(t)

    def phase(self, t: int) -> str:
        return self.ctx.schedule.phase(t)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """The constructor's keyword arguments with their defaults (config ``method.params``)."""
        if cls.__init__ is object.__init__:
            return {}
        sig = inspect.signature(cls.__init__)
        return {n: (None if p.default is inspect.Parameter.empty else p.default)
                for n, p in sig.parameters.items()
                if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


class OneShotMethod(AllocationMethod):
    """A method that chooses the ranks once, in :meth:`before_training`, and keeps them: it calls
    :meth:`fix` with its keep masks there; they are applied, frozen and compacted at step 0, the
    budget is the target throughout, and no later step decides anything (``eva``, ``fisher``)."""

    _keep: Keep | None = None

    def fix(self, keep: Keep) -> None:
        """Hard-mask every layer to ``keep`` now (``c`` untouched); step 0 applies and freezes it."""
        with torch.no_grad():
            for n, layer in self.ctx.layers.items():
                layer.soft_prune(keep[n])
                layer.hard_mask = True
        self._keep = keep

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        if self._keep is None:
            raise RuntimeError(f"method {self.name!r} allocates before training: call controller.before_training("
                               "run_batch, batches) with a few training batches before the first step")
        return self._keep if t == 0 else None

    def is_final(self, t: int) -> bool:
        return t == 0

    @property
    def changes_allocation(self) -> bool:
        return True

    def budget(self, t: int) -> int:
        return self.ctx.target

    def phase(self, t: int) -> str:
        return "decay" if t == 0 else "final"


# -- the shared decision rules ----------------------------------------------------------------------
def keep_top(layers: Mapping[str, RankOneLinear], scores: Mapping[str, torch.Tensor], budget: int,
             cost: Callable[[RankOneLinear], int], allowed: Mapping[str, torch.Tensor] | None = None,
             what: str = "scores") -> Keep:
    """Global top-``budget`` by score: components are taken in score order (stable: ties by layer
    order, then position) while their cost fits the budget, so the kept cost never exceeds it; with
    unit cost exactly the top ``budget`` are kept.  ``allowed`` (bool masks) excludes components."""
    names = list(layers)
    missing = [n for n in names if n not in scores]
    if missing:
        raise RuntimeError(f"{what} missing for layers {missing[:3]}")
    flat = torch.cat([scores[n].float().cpu() for n in names])
    if (flat < 0).any() or not torch.isfinite(flat).all():
        raise ValueError(f"{what}: negative or non-finite scores")
    costs = torch.cat([torch.full((layers[n].rank,), cost(layers[n])) for n in names])
    ok = (torch.cat([allowed[n].cpu().bool() for n in names]) if allowed is not None
          else torch.ones_like(flat, dtype=torch.bool))
    order = torch.sort(flat, descending=True, stable=True).indices
    keep_flat = torch.zeros_like(flat, dtype=torch.bool)
    if bool((costs == 1).all()) and allowed is None:
        keep_flat[order[:budget]] = True
    else:
        used = 0
        for i in order.tolist():
            if ok[i] and used + int(costs[i]) <= budget:
                keep_flat[i] = True
                used += int(costs[i])
    out, offset = {}, 0
    for n in names:
        r = layers[n].rank
        out[n] = keep_flat[offset: offset + r]
        offset += r
    return out


def keep_scored(layers: Mapping[str, RankOneLinear], scorer: Scorer, budget: int,
                cost: Callable[[RankOneLinear], int]) -> Keep:
    """Global top-``budget`` by ``scorer``'s scores (:func:`keep_top`), its refusals naming the scorer.

    In components every one of the top ``budget`` is kept; in parameters components are taken in
    score order while they fit (a greedy fill), so the active count never exceeds it."""
    scores = scorer.scores()
    missing = [n for n in layers if n not in scores]
    if missing:
        raise RuntimeError(f"scorer {scorer.name!r} has no scores for layers {missing[:3]}")
    try:
        return keep_top(layers, scores, budget, cost, what=f"scorer {scorer.name!r}")
    except ValueError:
        raise ValueError(f"scorer {scorer.name!r} returned negative or non-finite scores") from None


def keep_where(layers: Mapping[str, RankOneLinear], values: Mapping[str, torch.Tensor], threshold: float,
               cap: int, cost: Callable[[RankOneLinear], int]) -> Keep:
    """Keep by threshold, the budget as a cap: every component whose value is above ``threshold``,
    and if those cost more than ``cap``, only the largest of them that fit (:func:`keep_top`)."""
    above = {n: values[n].detach().float().cpu() > threshold for n in layers}
    if sum(int(above[n].sum()) * cost(layers[n]) for n in layers) <= cap:
        return above
    return keep_top(layers, {n: values[n].detach().float().abs() for n in layers}, cap, cost, allowed=above)


def uniform_prefix(layers: Mapping[str, RankOneLinear], budget: int, cost: Callable[[RankOneLinear], int]) -> Keep:
    """The same rank ``k`` in every layer, the largest whose total cost fits ``budget``, then one
    more component for layers in order while it fits: each layer keeps a prefix of its components."""
    items = list(layers.items())
    costs = [cost(layer) for _, layer in items]
    k = 0
    while k < max(layer.rank for _, layer in items) and sum(
            c * min(k + 1, layer.rank) for c, (_, layer) in zip(costs, items, strict=True)) <= budget:
        k += 1
    ranks = [min(k, layer.rank) for _, layer in items]
    used = sum(c * r for c, r in zip(costs, ranks, strict=True))
    for i, (_, layer) in enumerate(items):
        if ranks[i] < layer.rank and used + costs[i] <= budget:
            ranks[i] += 1
            used += costs[i]
    return {n: torch.arange(layer.rank) < r for (n, layer), r in zip(items, ranks, strict=True)}


# -- the registry -----------------------------------------------------------------------------------
def _check(name: str, obj: object) -> None:
    if not (isinstance(obj, type) and issubclass(obj, AllocationMethod)):
        raise RegistryError(f"method {name!r} must be an AllocationMethod subclass")


METHODS: Registry[type[AllocationMethod]] = Registry(
    "method", "dora_lab.methods", _check,
    packages=("dora_lab.methods",),  # every module of methods/: a new built-in is one new file there
)


def register_method(name: str, *, replace: bool = False) -> Callable[[type[AllocationMethod]], type[AllocationMethod]]:
    """Register an :class:`AllocationMethod` subclass as ``name`` (config ``method.name``)."""

    def decorate(cls: type[AllocationMethod]) -> type[AllocationMethod]:
        if isinstance(cls, type):
            cls.name = name
        METHODS.add(name, cls, replace=replace)
        return cls

    return decorate


def get_method(name: str) -> type[AllocationMethod]:
    return METHODS.get(name)


def list_methods() -> list[str]:
    return METHODS.names()


def make_method(name: str = DEFAULT_METHOD, **params: Any) -> AllocationMethod:
    """Build method ``name`` with hyper-parameters ``params``; unknown ones are refused by name,
    with the list of valid ones."""
    cls = get_method(name)
    return build_checked("method", name, cls, cls.hyperparameters(), params)
