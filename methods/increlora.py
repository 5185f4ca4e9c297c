"""``increlora``: start small and add rank-1 components where they matter most (IncreLoRA, Zhang et
al. 2023, arXiv:2308.12043).

Each layer starts with ``start_rank`` active components; the rest of its ``r0`` slots are an
inactive pool (hard-masked).  The budget grows along the schedule from that start to the target
(the cap).  At each prune (here: grow) step the deficit ``b(t) - active`` is filled: a layer's
importance is the sum of its active components' scores (the configured scorer, fed every step),
and the layers in descending importance each get one new component (their reserve first, else
their first free slot), round after round, while the cost fits and slots are free.

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

from typing import Any

import torch

from dora_lab.core.methods import AllocationMethod, Keep, register_method

#: A reserve's fixed gate: the official code's initial ``lora_E`` of a reserve (``add_reserve_param``).
RESERVE_GATE = 1e-5

WarmAB = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # slots, update count, A rows, B columns
WarmC = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # slots, update count, c


@register_method("increlora")
class IncreLoRA(AllocationMethod):
    grows = True
    pool = True
    uses_scorer = True
    follows_schedule = True

    def __init__(self, start_rank: int = 1, warmup: int = 10, advance: bool = True) -> None:
        if start_rank < 0:
            raise ValueError(f"start_rank must be >= 0, got {start_rank}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 step (1: no warm-up), got {warmup}")
        if not isinstance(advance, bool):
            raise ValueError(f"advance must be true or false, got {advance!r}")
        self.start_rank = int(start_rank)
        self.warmup = int(warmup)
        self.advance = advance
        self._before: dict[str, torch.Tensor] = {}  # the active masks before this step's decision
        self._reserved: dict[str, torch.Tensor] = {}  # the reserve slots before this step's decision
        # warming-up updates, per layer: of A rows and B columns, and of c (a promoted reserve's c
        # warms up while its A/B do not); each with the values before this step's update
        self._warm_ab: dict[str, WarmAB] = {}
        self._warm_c: dict[str, WarmC] = {}
        self._optimizer: torch.optim.Optimizer | None = None  # this step's, to zero a new reserve's state

    def start_budget(self, ctl: Any) -> int:
        return sum(ctl.cost(layer) * min(self.start_rank or 0, layer.rank) for layer in ctl.layers.values())

    def setup(self, ctl: Any) -> None:
        super().setup(ctl)
        with torch.no_grad():
            for layer in ctl.layers.values():
                layer.soft_prune(torch.arange(layer.rank) < (self.start_rank or 0))
                layer.hard_mask = True
        if self.advance:
            for layer in ctl.layers.values():
                self._draw_reserve(layer, fresh=False)  # the slot's A/B as constructed

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
            for name, (idx, k, a0, b0) in list(self._warm_ab.items()):
                layer = self.ctl.layers[name]
                w = ((k + 1) / self.warmup).to(device=layer.A.device, dtype=layer.A.dtype)  # k lives on the CPU
                layer.A[idx] = a0 + w[:, None] * (layer.A[idx] - a0)
                layer.B[:, idx] = b0 + w[None, :] * (layer.B[:, idx] - b0)
                left = k + 1 < self.warmup
                if bool(left.any()):
                    keep = idx[left]
                    self._warm_ab[name] = (keep, k[left] + 1, layer.A[keep].clone(), layer.B[:, keep].clone())
                else:
                    del self._warm_ab[name]
            for name, (idx, k, c0) in list(self._warm_c.items()):
                layer = self.ctl.layers[name]
                w = ((k + 1) / self.warmup).to(device=layer.c.device, dtype=layer.c.dtype)
                layer.c[idx] = c0 + w * (layer.c[idx] - c0)
                left = k + 1 < self.warmup
                if bool(left.any()):
                    keep = idx[left]
                    self._warm_c[name] = (keep, k[left] + 1, layer.c[keep].clone())
                else:
                    del self._warm_c[name]
        if update_scores:
            self.ctl.check_grads()
            self.ctl.scorer.update(self.ctl.layers)

    def importance(self) -> dict[str, float]:
        """A layer's importance: the sum of its active components' scores."""
        scores = self.ctl.scorer.scores()
        return {n: float((scores[n].float().cpu() * (layer.mask.cpu() > 0)).sum()) if n in scores else 0.0
                for n, layer in self.ctl.layers.items()}

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctl.schedule
        if not sched.is_prune_step(t):
            return None
        layers = self.ctl.layers
        keep = self.active_keep()
        self._before = {n: k.clone() for n, k in keep.items()}
        self._reserved = {n: self._reserve_slots(layer) for n, layer in layers.items()}
        deficit = sched.budget(t) - self.ctl.active_budget()
        importance = self.importance()
        order = sorted(layers, key=lambda n: -importance[n])  # stable: ties keep the layer order
        while deficit > 0:
            added = False
            for n in order:
                free = torch.nonzero(~keep[n]).flatten()
                free = free[torch.argsort((~self._reserved[n][free]).to(torch.uint8), stable=True)]  # reserve first
                cost = self.ctl.cost(layers[n])
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
        if self.ctl.frozen:  # freeze_mask ended the reserves
            self._warm_ab.clear()
            self._warm_c.clear()
            return
        generator = torch.Generator().manual_seed(2_000_003 + t)  # alike on every data-parallel rank
        with torch.no_grad():
            for name, layer in self.ctl.layers.items():
                new = keep[name].cpu() & ~before[name]
                promoted = new & reserved.get(name, torch.zeros_like(new))
                self._start_c(name, torch.nonzero(new).flatten())
                self._start_ab(name, torch.nonzero(new & ~promoted).flatten())
                if self.advance and new.any():
                    slot = self._draw_reserve(layer, fresh=True, generator=generator)
                    if slot is not None:
                        self._start_ab(name, slot)

    def _start_ab(self, name: str, idx: torch.Tensor) -> None:
        if not idx.numel():
            return
        layer = self.ctl.layers[name]
        k = torch.zeros(idx.numel(), dtype=torch.long)
        if name in self._warm_ab:
            idx, k = torch.cat([self._warm_ab[name][0], idx]), torch.cat([self._warm_ab[name][1], k])
        self._warm_ab[name] = (idx, k, layer.A[idx].clone(), layer.B[:, idx].clone())

    def _start_c(self, name: str, idx: torch.Tensor) -> None:
        if not idx.numel():
            return
        layer = self.ctl.layers[name]
        k = torch.zeros(idx.numel(), dtype=torch.long)
        if name in self._warm_c:
            idx, k = torch.cat([self._warm_c[name][0], idx]), torch.cat([self._warm_c[name][1], k])
        self._warm_c[name] = (idx, k, layer.c[idx].clone())

    def state_dict(self) -> dict[str, Any]:
        return {"warm_ab": {n: (i.clone(), k.clone(), a.clone(), b.clone()) for n, (i, k, a, b) in self._warm_ab.items()},
                "warm_c": {n: (i.clone(), k.clone(), c.clone()) for n, (i, k, c) in self._warm_c.items()},
                "reserve": {n: layer.reserve.clone() for n, layer in self.ctl.layers.items()
                            if layer.reserve is not None}}

    def load_state_dict(self, state: Any) -> None:
        self._warm_ab = {n: (i.clone(), k.clone(), a.clone(), b.clone())
                         for n, (i, k, a, b) in state.get("warm_ab", {}).items()}
        self._warm_c = {n: (i.clone(), k.clone(), c.clone()) for n, (i, k, c) in state.get("warm_c", {}).items()}
        for n, (idx, k, a0, b0, c0) in state.get("warming", {}).items():  # saved before advance learning
            self._warm_ab[n] = (idx.clone(), k.clone(), a0.clone(), b0.clone())
            self._warm_c[n] = (idx.clone(), k.clone(), c0.clone())
        saved = state.get("reserve")
        for n, layer in self.ctl.layers.items():
            gate = None if saved is None else saved.get(n)
            layer.reserve = None if gate is None else gate.to(device=layer.c.device, dtype=layer.c.dtype).clone()
        if saved is None and self.advance and not self.ctl.frozen:  # saved without reserves
            for layer in self.ctl.layers.values():
                self._draw_reserve(layer, fresh=False)
