"""``dora`` (the default): score every component each step, keep the global top ``b(t)`` of the
schedule's budget at its prune steps (DoRA, Mao et al. ACL 2024; AdaLoRA's schedule and scorers are
the same shape).  The configured ``scorer`` and ``schedule`` are its parts; docs/algorithms.md has the
formulas.  Pruning is soft until the last prune step, which freezes the mask."""

from __future__ import annotations

import torch

from dora_lab.core.methods import AllocationMethod, Keep, keep_scored, register_method
from dora_lab.core.scorers import check_grads


@register_method("dora")
class ScoreAndSchedule(AllocationMethod):
    """Scores from the configured scorer, fed every step until the freeze; top-b at prune steps."""

    uses_scorer = True

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        if update_scores:
            scorer = self.configured_scorer()
            check_grads(scorer, self.ctx.layers)
            scorer.update(self.ctx.layers)

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctx.schedule
        # a prune step whose gradients were skipped (fp16 overflow) before any score exists waits
        # for the next step; the final step always decides (and says so if it cannot)
        scorer = self.configured_scorer()
        waiting = not update_scores and not sched.is_final_step(t) and not scorer.scores()
        if sched.is_prune_step(t) and not waiting:
            return keep_scored(self.ctx.layers, scorer, sched.budget(t), self.ctx.cost)
        return None
