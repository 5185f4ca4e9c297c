"""``increlora``: start small and add rank-1 components where they matter most (IncreLoRA, Zhang et
al. 2023, arXiv:2308.12043).

Each layer starts with ``start_rank`` active components; the rest of its ``r0`` slots are an
inactive pool (hard-masked).  The budget grows along the schedule from that start to the target
(the cap).  At each prune (here: grow) step the deficit ``b(t) - active`` is filled: a layer's
importance is the sum of its active components' scores (the configured scorer, fed every step),
and the layers in descending importance each get one new component (their first free slot), round
after round, while the cost fits and slots are free.  A new component is fresh
(``RankOneLinear.activate``: new ``A`` row and ``B`` column, ``c = 0`` so the output does not jump,
its AdamW moments zeroed) and warms up: on its ``k``-th optimizer step after it was added, its
update (``A`` row, ``B`` column, ``c``) is scaled by ``k / warmup`` (IncreLoRA restarts the
learning-rate warm-up for new parameters).  The last prune step freezes the masks and compacts.
"""

from __future__ import annotations

from typing import Any

import torch

from dora_lab.core.methods import AllocationMethod, Keep, register_method


@register_method("increlora")
class IncreLoRA(AllocationMethod):
    grows = True
    pool = True
    uses_scorer = True
    follows_schedule = True

    def __init__(self, start_rank: int = 1, warmup: int = 10) -> None:
        if start_rank < 0:
            raise ValueError(f"start_rank must be >= 0, got {start_rank}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 step (1: no warm-up), got {warmup}")
        self.start_rank = int(start_rank)
        self.warmup = int(warmup)
        # layer -> (slots warming up, their update count so far, A rows, B columns, c before this step)
        self._before: dict[str, torch.Tensor] = {}  # the active masks before this step's decision
        self._warming: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def start_budget(self, ctl: Any) -> int:
        return sum(ctl.cost(layer) * min(self.start_rank or 0, layer.rank) for layer in ctl.layers.values())

    def setup(self, ctl: Any) -> None:
        super().setup(ctl)
        with torch.no_grad():
            for layer in ctl.layers.values():
                layer.soft_prune(torch.arange(layer.rank) < (self.start_rank or 0))
                layer.hard_mask = True

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        with torch.no_grad():
            for name, (idx, k, a0, b0, c0) in list(self._warming.items()):
                layer = self.ctl.layers[name]
                w = ((k + 1) / self.warmup).to(device=layer.c.device, dtype=layer.c.dtype)  # k lives on the CPU
                layer.A[idx] = a0 + w[:, None] * (layer.A[idx] - a0)
                layer.B[:, idx] = b0 + w[None, :] * (layer.B[:, idx] - b0)
                layer.c[idx] = c0 + w * (layer.c[idx] - c0)
                left = k + 1 < self.warmup
                if bool(left.any()):
                    keep = idx[left]
                    self._warming[name] = (keep, k[left] + 1, layer.A[keep].clone(), layer.B[:, keep].clone(),
                                           layer.c[keep].clone())
                else:
                    del self._warming[name]
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
        keep = {n: layer.mask.cpu() > 0 for n, layer in layers.items()}
        self._before = {n: k.clone() for n, k in keep.items()}
        deficit = sched.budget(t) - self.ctl.active_budget()
        importance = self.importance()
        order = sorted(layers, key=lambda n: -importance[n])  # stable: ties keep the layer order
        while deficit > 0:
            added = False
            for n in order:
                free = torch.nonzero(~keep[n]).flatten()
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
        if self.ctl.frozen:
            self._warming.clear()
            return
        with torch.no_grad():
            for name, layer in self.ctl.layers.items():
                new = torch.nonzero(keep[name].cpu() & ~before[name]).flatten()
                if not new.numel():
                    continue
                idx, k = new, torch.zeros(new.numel(), dtype=torch.long)
                if name in self._warming:
                    idx, k = torch.cat([self._warming[name][0], idx]), torch.cat([self._warming[name][1], k])
                self._warming[name] = (idx, k, layer.A[idx].clone(), layer.B[:, idx].clone(), layer.c[idx].clone())

    def state_dict(self) -> dict[str, Any]:
        return {"warming": {n: tuple(v.clone() for v in w) for n, w in self._warming.items()}}

    def load_state_dict(self, state: Any) -> None:
        self._warming = {n: tuple(v.clone() for v in w) for n, w in state.get("warming", {}).items()}
