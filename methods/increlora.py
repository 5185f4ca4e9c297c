"""``increlora``: start small and add rank-1 components where they matter most (IncreLoRA, Zhang et
al. 2023, arXiv:2308.12043).

Each layer starts with ``start_rank`` active components; the rest of its ``r0`` slots are an
inactive pool (hard-masked).  The budget grows along the schedule from that start to the target
(the cap).  At each prune (here: grow) step the deficit ``b(t) - active`` is filled: the layers in
descending importance each get one new component (their reserve first, else their first free
slot), round after round, while the cost fits and slots are free.

A layer's importance (``importance: official``, the default) is the official code's module score
(FeiyuZhang98/IncreLoRA, ``loralib/loralib/increlora.py``: ``SVDLinear.backward_hook`` and
``RankAllocator.update_ipt`` / ``calculate_score``), whatever component scorer is configured: at
every optimizer step ``s = sum |dW * dL/d(dW)| / sqrt(d_out * d_in)`` with ``dW`` the layer's whole
update (reserves included, as the official ``W`` concatenates them) and ``dL/d(dW) = sum_tokens
g_out x^T`` (a forward hook keeps the input ``x``, a hook on the output its gradient; summed over
the micro-batches of a step, ``dW`` as in their forward), smoothed as AdaLoRA does::

    I <- beta1 I + (1 - beta1) s;   U <- beta2 U + (1 - beta2) |s - I|;   importance = I * U

(both EMAs start at 0, the official ``beta1 = beta2 = 0.85``).  ``importance: scorer`` is the old
dora_lab rule, a departure kept for comparison: the sum of the active components' scores from the
configured scorer (with ``magnitude`` a layer with more components outranks one with fewer).

Advance learning (``advance``, on by default as in the official code, whose ``advance_learn``
defaults to True): every layer keeps one *reserve* component in a free slot
(:meth:`RankOneLinear.set_reserve`).  It is inactive (no budget counts it) but acts in the forward
pass with the fixed gate ``c = 1e-5`` (the official ``add_reserve_param``'s ``E``), so its ``A`` row
and ``B`` column train ahead while its ``c`` does not.  A layer's next new component is its
reserve: it keeps its trained ``A``/``B`` (and their AdamW moments), ``c`` starts at ``1e-5`` and
trains from then on (its moments zeroed), and a fresh reserve is drawn in the layer's next free
slot.  Without ``advance`` (or for a layer's second and later new components in one decision) a
new component is fresh (``RankOneLinear.activate``: new ``A`` row and ``B`` column, ``c = 0``, its
AdamW moments zeroed).

Restart warm-up: a new parameter's ``k``-th optimizer update is scaled by ``k / warmup``
(IncreLoRA gives each new parameter group a learning rate that warms up again): a fresh
component's ``A`` row, ``B`` column and ``c``; a promoted reserve's ``c`` (its ``A``/``B`` started
theirs when the reserve was drawn); a reserve drawn at a grow step's ``A``/``B`` (the reserves drawn
at the start warm up with the run's own learning-rate schedule).  The last prune step freezes the
masks, which ends the reserves, and compacts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from dora_lab.core.context import MethodContext, Pool
from dora_lab.core.methods import AllocationMethod, Keep, register_method
from dora_lab.core.scorers import check_grads

#: A reserve's fixed gate: the official code's initial ``lora_E`` of a reserve (``add_reserve_param``).
RESERVE_GATE = 1e-5

Warm = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # slots, update count, their values before this step
SLOT_DIM = {"A": 0, "B": 1, "c": 0}  # where a component's slot is in each warmed part: A's rows, B's columns, c
IMPORTANCE = ("official", "scorer")


def _slots(p: torch.Tensor, part: str, idx: torch.Tensor) -> torch.Tensor:
    return p[:, idx] if SLOT_DIM[part] == 1 else p[idx]


@register_method("increlora")
class IncreLoRA(AllocationMethod):
    grows = True
    pool = True
    uses_scorer = True
    follows_schedule = True

    def __init__(self, start_rank: int = 1, warmup: int = 10, advance: bool = True, importance: str = "official",
                 beta1: float = 0.85, beta2: float = 0.85) -> None:
        if start_rank < 0:
            raise ValueError(f"start_rank must be >= 0, got {start_rank}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 step (1: no warm-up), got {warmup}")
        if not isinstance(advance, bool):
            raise ValueError(f"advance must be true or false, got {advance!r}")
        if importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)} (official: the module score "
                             f"|dW * dL/d(dW)| of the official code; scorer: the configured scorer's sum), "
                             f"got {importance!r}")
        for key, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{key} must be in [0, 1) (an EMA factor of the module score), got {beta}")
        self.importance_rule = importance
        self.uses_scorer = importance == "scorer"  # type: ignore[misc]
        self.betas = (float(beta1), float(beta2))
        self.module_score = ModuleScore() if importance == "official" else None
        self.start_rank = int(start_rank)
        self.warmup = int(warmup)
        self.advance = advance
        self._before: dict[str, torch.Tensor] = {}  # the active masks before this step's decision
        self._reserved: dict[str, torch.Tensor] = {}  # the reserve slots before this step's decision
        # warming-up updates, per part (A rows, B columns, c: a promoted reserve's c warms up while its
        # A/B do not) and layer, with the values before this step's update
        self._warm: dict[str, dict[str, Warm]] = {part: {} for part in SLOT_DIM}
        self._optimizer: torch.optim.Optimizer | None = None  # this step's, to zero a new reserve's state

    def start_budget(self, pool: Pool) -> int:
        return sum(pool.cost(layer) * min(self.start_rank or 0, layer.rank) for layer in pool.layers.values())

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        with torch.no_grad():
            for layer in ctx.layers.values():
                layer.soft_prune(torch.arange(layer.rank) < (self.start_rank or 0))
                layer.hard_mask = True
        if self.advance:
            for layer in ctx.layers.values():
                self._draw_reserve(layer, fresh=False)  # the slot's A/B as constructed
        if self.module_score is not None:
            self.module_score.attach(ctx.layers)

    @staticmethod
    def _reserve_slots(layer: Any) -> torch.Tensor:
        return (layer.reserve.cpu() != 0) if layer.reserve is not None else torch.zeros(layer.rank, dtype=torch.bool)

    def _draw_reserve(self, layer: Any, fresh: bool, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Give ``layer`` a reserve in its first free slot if it has none; returns that slot."""
        if self._reserve_slots(layer).any():
            return None
        free = torch.nonzero(layer.mask.cpu() == 0).flatten()
        if not free.numel():
            return None
        slot = free[:1]
        layer.set_reserve(torch.arange(layer.rank) == slot, RESERVE_GATE, self._optimizer, generator, fresh=fresh)
        return slot

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        self._optimizer = optimizer
        with torch.no_grad():
            for part, warming in self._warm.items():
                for name, (idx, k, before) in list(warming.items()):
                    p = getattr(self.ctx.layers[name], part)
                    w = ((k + 1) / self.warmup).to(device=p.device, dtype=p.dtype)  # k lives on the CPU
                    w = w[None, :] if SLOT_DIM[part] == 1 else (w[:, None] if p.dim() == 2 else w)
                    stepped = before + w * (_slots(p, part, idx) - before)
                    if SLOT_DIM[part] == 1:
                        p[:, idx] = stepped
                    else:
                        p[idx] = stepped
                    left = k + 1 < self.warmup
                    if bool(left.any()):
                        keep = idx[left]
                        warming[name] = (keep, k[left] + 1, _slots(p, part, keep).clone())
                    else:
                        del warming[name]
        if update_scores and self.uses_scorer:  # importance: scorer (the official rule reads no scorer)
            scorer = self.configured_scorer()
            check_grads(scorer, self.ctx.layers)
            scorer.update(self.ctx.layers)
        if self.module_score is not None:
            self.module_score.step(update_scores, *self.betas)

    def importance(self) -> dict[str, float]:
        """A layer's importance: the official smoothed module score, or (``importance: scorer``) the
        sum of its active components' scores from the configured scorer."""
        if self.module_score is not None:
            return {n: self.module_score.importance(n) for n in self.ctx.layers}
        scores = self.configured_scorer().scores()
        return {n: float((scores[n].float().cpu() * (layer.mask.cpu() > 0)).sum()) if n in scores else 0.0
                for n, layer in self.ctx.layers.items()}

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctx.schedule
        if not sched.is_prune_step(t):
            return None
        layers = self.ctx.layers
        keep = self.active_keep()
        self._before = {n: k.clone() for n, k in keep.items()}
        self._reserved = {n: self._reserve_slots(layer) for n, layer in layers.items()}
        deficit = sched.budget(t) - self.ctx.active_budget()
        importance = self.importance()
        order = sorted(layers, key=lambda n: -importance[n])  # stable: ties keep the layer order
        while deficit > 0:
            added = False
            for n in order:
                free = torch.nonzero(~keep[n]).flatten()
                free = free[torch.argsort((~self._reserved[n][free]).to(torch.uint8), stable=True)]  # reserve first
                cost = self.ctx.cost(layers[n])
                if free.numel() and cost <= deficit:
                    keep[n][int(free[0])] = True
                    deficit -= cost
                    added = True
            if not added:
                break
        return keep

    def after_apply(self, t: int, keep: Keep) -> None:
        before, self._before = self._before, {}
        reserved, self._reserved = self._reserved, {}
        if self.ctx.frozen:  # freeze_mask ended the reserves
            for warming in self._warm.values():
                warming.clear()
            if self.module_score is not None:
                self.module_score.detach()  # no decision is to come
            return
        generator = torch.Generator().manual_seed(2_000_003 + t)  # alike on every data-parallel rank
        with torch.no_grad():
            for name, layer in self.ctx.layers.items():
                new = keep[name].cpu() & ~before[name]
                promoted = new & reserved.get(name, torch.zeros_like(new))
                self._start(name, "c", torch.nonzero(new).flatten())
                self._start(name, "AB", torch.nonzero(new & ~promoted).flatten())
                if self.advance and new.any():
                    slot = self._draw_reserve(layer, fresh=True, generator=generator)
                    if slot is not None:
                        self._start(name, "AB", slot)

    def _start(self, name: str, parts: str, idx: torch.Tensor) -> None:
        """Slots ``idx`` of layer ``name`` start warming up in ``parts`` (of "A", "B", "c")."""
        if not idx.numel():
            return
        for part in parts:
            warming, slots, k = self._warm[part], idx, torch.zeros(idx.numel(), dtype=torch.long)
            if name in warming:
                slots, k = torch.cat([warming[name][0], idx]), torch.cat([warming[name][1], k])
            warming[name] = (slots, k, _slots(getattr(self.ctx.layers[name], part), part, slots).clone())

    def state_dict(self) -> dict[str, Any]:
        return {"warm": {part: {n: tuple(t.clone() for t in w) for n, w in warming.items()}
                         for part, warming in self._warm.items()},
                "module_score": {} if self.module_score is None else self.module_score.state_dict(),
                "reserve": {n: layer.reserve.clone() for n, layer in self.ctx.layers.items()
                            if layer.reserve is not None}}

    def load_state_dict(self, state: Any) -> None:
        self._warm = {part: {n: tuple(t.clone() for t in w) for n, w in state.get("warm", {}).get(part, {}).items()}
                      for part in SLOT_DIM}
        old = {"A": {n: (i, k, a) for n, (i, k, a, _) in state.get("warm_ab", {}).items()},  # saved by older
               "B": {n: (i, k, b) for n, (i, k, _, b) in state.get("warm_ab", {}).items()},  # dora_lab versions
               "c": dict(state.get("warm_c", {}))}
        for n, (idx, k, a0, b0, c0) in state.get("warming", {}).items():  # before advance learning
            old["A"][n], old["B"][n], old["c"][n] = (idx, k, a0), (idx, k, b0), (idx, k, c0)
        for part, warming in old.items():
            self._warm[part].update({n: tuple(t.clone() for t in w) for n, w in warming.items()})
        if self.module_score is not None:
            self.module_score.load_state_dict(state.get("module_score", {}))
            if self.ctx.frozen:
                self.module_score.detach()
        saved = state.get("reserve")
        for n, layer in self.ctx.layers.items():
            gate = None if saved is None else saved.get(n)
            layer.reserve = None if gate is None else gate.to(device=layer.c.device, dtype=layer.c.dtype).clone()
        if saved is None and self.advance and not self.ctx.frozen:  # saved without reserves
            for layer in self.ctx.layers.values():
                self._draw_reserve(layer, fresh=False)


class ModuleScore:
    """IncreLoRA's module importance (the official ``SVDLinear.backward_hook`` and
    ``RankAllocator.update_ipt``): per layer ``s = sum |dW * dL/d(dW)| / sqrt(d_out * d_in)`` at each
    optimizer step, smoothed into ``I`` (sensitivity) and ``U`` (uncertainty); the importance is ``I * U``.

    ``dL/d(dW)`` is the gradient with respect to the layer's whole update, ``sum_tokens g x^T``
    (``g`` the gradient of the layer's output, ``x`` its input): the component gradients do not give
    it, so hooks collect it during the backward pass of every training forward (one ``d_out x d_in``
    product per layer, as the official code's autograd does for its ``W``)."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.grad: dict[str, torch.Tensor] = {}  # this step's dL/d(dW), summed over its micro-batches
        self.delta: dict[str, torch.Tensor] = {}  # dW as in this step's forward (before the optimizer step)
        self.avg: dict[str, torch.Tensor] = {}  # I
        self.unc: dict[str, torch.Tensor] = {}  # U

    def attach(self, layers: dict[str, Any]) -> None:
        self.detach()
        self.handles = [layer.register_forward_hook(self._hook(n)) for n, layer in layers.items()]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.grad, self.delta = [], {}, {}

    def _hook(self, name: str) -> Any:
        def forward(layer: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and out.requires_grad and layer.rank):
                return  # an evaluation forward: no backward follows
            x = args[0].detach()

            def backward(g: torch.Tensor) -> None:
                with torch.no_grad():  # in float32 at least (under autocast g and x may be half)
                    dt = torch.promote_types(g.dtype, torch.float32)
                    m = g.reshape(-1, layer.out_features).to(dt).T @ x.reshape(-1, layer.in_features).to(dt)
                    if name in self.grad:
                        self.grad[name] += m
                    else:
                        self.grad[name] = m
                        self.delta[name] = layer.delta_weight().detach().to(dt)
            out.register_hook(backward)
        return forward

    def step(self, update: bool, beta1: float, beta2: float) -> None:
        """Fold this step's scores into the EMAs (not for a step whose gradients overflowed)."""
        grad, delta, self.grad, self.delta = self.grad, self.delta, {}, {}
        if not update:
            return
        for n, g in grad.items():
            s = (delta[n] * g).abs().sum() / math.sqrt(g.numel())
            avg = beta1 * self.avg.get(n, torch.zeros_like(s)) + (1 - beta1) * s
            self.unc[n] = beta2 * self.unc.get(n, torch.zeros_like(s)) + (1 - beta2) * (s - avg).abs()
            self.avg[n] = avg

    def importance(self, name: str) -> float:
        """``I * U`` of layer ``name`` (0 before its first backward)."""
        if name not in self.avg:
            return 0.0
        return float(self.avg[name] * self.unc[name])

    def state_dict(self) -> dict[str, Any]:
        return {"avg": {n: v.clone() for n, v in self.avg.items()}, "unc": {n: v.clone() for n, v in self.unc.items()}}

    def load_state_dict(self, state: Any) -> None:
        self.avg = {n: v.clone() for n, v in state.get("avg", {}).items()}
        self.unc = {n: v.clone() for n, v in state.get("unc", {}).items()}
