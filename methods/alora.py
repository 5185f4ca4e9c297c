"""``alora``: score a component by the validation loss change when it is masked out, prune the
lowest, hand the freed budget to other layers (ALoRA, Liu et al., NAACL 2024, its AB-LoRA score).

Every layer starts with the same rank, a prefix meeting the target (the budget is a cap, constant).
At every ``every``-th prune step of the schedule (default 20; the first included) before its last,
every active component ``i`` gets the paper's eq. 6 AB-LoRA score (``score: paper``; with the
paper's ``S = -L``)::

    IS(i) = S(all) - S(without i) + S(only i) = L_val(without i) - L_val(all) - L_val(only i)

on one fixed validation sample (``controller.validation_loss``, ``rows`` rows, default 16):
removing an important component raises the loss, and keeping it alone (every other component of
every layer masked out) lowers it.  ``score: two_term`` (a departure, the old dora_lab rule at half
the cost) drops the third term: ``L_val(without i) - L_val(all)``.  No official code was found
(searched GitHub for the paper, Liu et al. 2024, arXiv:2403.16187).  The ``swap`` (default 2) lowest-scoring components are pruned, and their cost goes to
the layers with the highest mean score among their remaining components (one new component each,
round after round, while the cost fits the cap and the layer has a free slot; a layer that just
lost a component gets none back in the same step).  A new component is fresh
(``RankOneLinear.activate``: new ``A`` row and ``B`` column, ``c = 0``, AdamW moments zeroed).  The
last prune step freezes the masks as they are.  A decision costs one validation forward per active
component, two with ``score: paper``: the defaults (2 components every 20th prune step, 16 rows) move 4 components over a
``configs/cola.yaml`` run (the old 1 every 10th, 32 rows: 3) at a quarter of the validation
tokens, 2.8% of a step with the two-term score (benchmarks/results/bench_methods.md; the old: 10%;
the paper's score: 6.2%, docs/methods.md).  With ``dora_lab.train``'s validation loss (:class:`~dora_lab.run.validation.
ValidationLoss`) they run as stacked copies of the sample, many components a forward.
"""

from __future__ import annotations

from typing import Any

import torch

from dora_lab.core.context import MethodContext
from dora_lab.core.methods import AllocationMethod, Keep, register_method, uniform_prefix

SCORES = ("paper", "two_term")


@register_method("alora")
class ALoRA(AllocationMethod):
    pool = True
    follows_schedule = True
    needs_validation = True

    def __init__(self, swap: int = 2, rows: int = 16, every: int = 20, score: str = "paper") -> None:
        if swap < 1:
            raise ValueError(f"swap must be >= 1 (components pruned and re-allocated per decision), got {swap}")
        if rows < 1:
            raise ValueError(f"rows must be >= 1 (validation rows per score), got {rows}")
        if every < 1:
            raise ValueError(f"every must be >= 1 (re-allocate at every n-th prune step), got {every}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)} (paper: eq. 6, L(without i) - L(all) - "
                             f"L(only i); two_term: without the last term), got {score!r}")
        self.score = score
        self.swap = int(swap)
        self.every = int(every)
        self.prune_steps = 0  # prune steps seen before the last
        self.validation_rows = int(rows)
        self.last_scores: dict[str, torch.Tensor] = {}

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        start = uniform_prefix(ctx.layers, ctx.target, ctx.cost)
        with torch.no_grad():
            for n, layer in ctx.layers.items():
                layer.soft_prune(start[n])
                layer.hard_mask = True

    def budget(self, t: int) -> int:
        return self.ctx.target

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """``IS_i`` (``score: paper``) or ``L(without i) - L(all)`` for every active component
        (inactive ones: NaN)."""
        loss = self.ctx.validation_loss
        if loss is None:
            raise RuntimeError("method 'alora' scores on a validation batch: call controller.set_validation(loss_fn) "
                               "(dora_lab.train does so from the task's first evaluation split)")
        full = float(loss())
        layers = self.ctx.layers
        active = [(n, i) for n, layer in layers.items() for i in torch.nonzero(layer.mask > 0).flatten().tolist()]
        out = {n: torch.full((layer.rank,), float("nan"), dtype=torch.float64) for n, layer in layers.items()}
        drops = [(layers[n], i) for n, i in active]
        if hasattr(loss, "without") and hasattr(loss, "alone"):  # dora_lab.train's ValidationLoss: stacked copies
            dropped = loss.without(drops)
            alone = loss.alone(drops, list(layers.values())) if self.score == "paper" else None
        else:  # any loss(): mask in turn
            dropped = [self._masked(loss, {(n, i)}, keep=False) for n, i in active]
            alone = [self._masked(loss, {(n, i)}, keep=True) for n, i in active] if self.score == "paper" else None
        for k, ((n, i), value) in enumerate(zip(active, dropped, strict=True)):
            out[n][i] = value - full - (alone[k] if alone is not None else 0.0)
        return out

    def _masked(self, loss: Any, picks: set[tuple[str, int]], keep: bool) -> float:
        """``loss()`` with the components ``picks`` masked out (``keep``: with only them left)."""
        saved = {n: layer.mask.clone() for n, layer in self.ctx.layers.items()}
        try:
            for n, layer in self.ctx.layers.items():
                for i in range(layer.rank):
                    if ((n, i) in picks) != keep:
                        layer.mask[i] = 0.0
            return float(loss())
        finally:
            for n, layer in self.ctx.layers.items():
                layer.mask.copy_(saved[n])

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctx.schedule
        if not sched.is_prune_step(t):
            return None
        layers = self.ctx.layers
        keep = self.active_keep()
        if sched.is_final_step(t):
            return keep
        self.prune_steps += 1
        if (self.prune_steps - 1) % self.every:
            return None
        scores = self.last_scores = self.scores()
        active = sorted(((float(s[i]), li, i) for li, (n, s) in enumerate(scores.items())
                         for i in torch.nonzero(keep[n]).flatten().tolist()))
        names = list(layers)
        lost = set()
        for _, li, i in active[: self.swap]:
            keep[names[li]][i] = False
            lost.add(names[li])

        def importance(n: str) -> float:
            s = scores[n][keep[n]]
            return float(s.mean()) if s.numel() else float("-inf")

        order = sorted((n for n in names if n not in lost), key=lambda n: -importance(n))
        room = self.ctx.target - sum(self.ctx.cost(layers[n]) * int(keep[n].sum()) for n in names)
        added = True
        while added:
            added = False
            for n in order:
                free = torch.nonzero(~keep[n]).flatten()
                if free.numel() and self.ctx.cost(layers[n]) <= room:
                    keep[n][int(free[0])] = True
                    room -= self.ctx.cost(layers[n])
                    added = True
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {"prune_steps": self.prune_steps}

    def load_state_dict(self, state: Any) -> None:
        self.prune_steps = int(state.get("prune_steps", 0))
