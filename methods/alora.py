"""``alora``: score a component by the validation loss change when it is masked out, prune the
lowest, hand the freed budget to other layers (ALoRA, Liu et al., NAACL 2024, its AB-LoRA score).

Every layer starts with the same rank, a prefix meeting the target (the budget is a cap, constant).
At every ``every``-th prune step of the schedule (default 20; the first included) before its last,
every active component ``i`` gets

    S_i = L_val(without i) - L_val(all)

on one fixed validation sample (``controller.validation_loss``, ``rows`` rows, default 16; removing
an important component raises the loss).  The ``swap`` (default 2) lowest-scoring components are pruned, and their cost goes to
the layers with the highest mean score among their remaining components (one new component each,
round after round, while the cost fits the cap and the layer has a free slot; a layer that just
lost a component gets none back in the same step).  A new component is fresh
(``RankOneLinear.activate``: new ``A`` row and ``B`` column, ``c = 0``, AdamW moments zeroed).  The
last prune step freezes the masks as they are.  A decision costs one validation forward per active
component: the defaults (2 components every 20th prune step, 16 rows) move 4 components over a
``configs/cola.yaml`` run (the old 1 every 10th, 32 rows: 3) at a quarter of the validation
tokens, 2.8% of a step (benchmarks/results/bench_methods.md; the old: 10%).  With ``dora_lab.train``'s validation loss (:class:`~dora_lab.run.validation.
ValidationLoss`) they run as stacked copies of the sample, many components a forward.
"""

from __future__ import annotations

from typing import Any

import torch

from dora_lab.core.methods import AllocationMethod, Keep, register_method, uniform_prefix


@register_method("alora")
class ALoRA(AllocationMethod):
    pool = True
    follows_schedule = True
    needs_validation = True

    def __init__(self, swap: int = 2, rows: int = 16, every: int = 20) -> None:
        if swap < 1:
            raise ValueError(f"swap must be >= 1 (components pruned and re-allocated per decision), got {swap}")
        if rows < 1:
            raise ValueError(f"rows must be >= 1 (validation rows per score), got {rows}")
        if every < 1:
            raise ValueError(f"every must be >= 1 (re-allocate at every n-th prune step), got {every}")
        self.swap = int(swap)
        self.every = int(every)
        self.prune_steps = 0  # prune steps seen before the last
        self.validation_rows = int(rows)
        self.last_scores: dict[str, torch.Tensor] = {}

    def setup(self, ctl: Any) -> None:
        super().setup(ctl)
        start = uniform_prefix(ctl.layers, ctl.target, ctl.cost)
        with torch.no_grad():
            for n, layer in ctl.layers.items():
                layer.soft_prune(start[n])
                layer.hard_mask = True

    def budget(self, t: int) -> int:
        return self.ctl.target

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """``S_i = L(without i) - L(all)`` for every active component (inactive ones: NaN)."""
        loss = self.ctl.validation_loss
        if loss is None:
            raise RuntimeError("method 'alora' scores on a validation batch: call controller.set_validation(loss_fn) "
                               "(dora_lab.train does so from the task's first evaluation split)")
        full = float(loss())
        active = [(n, i) for n, layer in self.ctl.layers.items()
                  for i in torch.nonzero(layer.mask > 0).flatten().tolist()]
        out = {n: torch.full((layer.rank,), float("nan"), dtype=torch.float64) for n, layer in self.ctl.layers.items()}
        if hasattr(loss, "without"):  # dora_lab.train's ValidationLoss: stacked copies, one forward for many
            dropped = loss.without([(self.ctl.layers[n], i) for n, i in active])
        else:  # any loss(): mask each component in turn
            dropped = []
            for n, i in active:
                mask = self.ctl.layers[n].mask
                mask[i] = 0.0
                try:
                    dropped.append(float(loss()))
                finally:
                    mask[i] = 1.0
        for (n, i), value in zip(active, dropped, strict=True):
            out[n][i] = value - full
        return out

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctl.schedule
        if not sched.is_prune_step(t):
            return None
        layers = self.ctl.layers
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
        room = self.ctl.target - sum(self.ctl.cost(layers[n]) * int(keep[n].sum()) for n in names)
        added = True
        while added:
            added = False
            for n in order:
                free = torch.nonzero(~keep[n]).flatten()
                if free.numel() and self.ctl.cost(layers[n]) <= room:
                    keep[n][int(free[0])] = True
                    room -= self.ctl.cost(layers[n])
                    added = True
        return keep

    def state_dict(self) -> dict[str, Any]:
        return {"prune_steps": self.prune_steps}

    def load_state_dict(self, state: Any) -> None:
        self.prune_steps = int(state.get("prune_steps", 0))
