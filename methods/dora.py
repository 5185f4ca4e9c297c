"""``dora`` (the default): score every component each step, keep the global top ``b(t)`` of the
schedule's budget at its prune steps (DoRA, Mao et al. ACL 2024; AdaLoRA's schedule and scorers are
the same shape).  The configured ``scorer`` and ``schedule`` are its parts; docs/algorithms.md has the
formulas.  Pruning is soft until the last prune step, which freezes the mask."""

from __future__ import annotations

import torch

from dora_lab.core.methods import AllocationMethod, Keep, register_method


@register_method("dora")
class ScoreAndSchedule(AllocationMethod):
    """Scores from the configured scorer, fed every step until the freeze; top-b at prune steps."""

    uses_scorer = True

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        if update_scores:
            self.ctl.check_grads()
            self.ctl.scorer.update(self.ctl.layers)

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctl.schedule
        # a prune step whose gradients were skipped (fp16 overflow) before any score exists waits
        # for the next step; the final step always decides (and says so if it cannot)
        waiting = not update_scores and not sched.is_final_step(t) and not self.ctl.scorer.scores()
        if sched.is_prune_step(t) and not waiting:
            return self.ctl.decide(sched.budget(t))
        return None
