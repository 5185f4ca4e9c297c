"""``sora``: sparse gates by a proximal L1 step (SoRA, Ding et al., EMNLP 2023).

dora_lab's ``c`` is SoRA's gate.  After every optimizer step each gate is soft-thresholded with
the step's learning rate ``eta`` (that of ``c``'s parameter group)::

    c <- sign(c) * max(|c| - eta * lam, 0)

so the L1 penalty ``lam * ||c||_1`` is handled by its proximal operator, and a gate that reaches
zero stays there until the loss gradient pulls it out again.  The rank is the number of non-zero
gates: at the schedule's prune steps the components whose ``|c|`` is above ``threshold`` are kept,
the budget ``b(t)`` as a cap (if more are above it, the largest ``|c|`` that fit); the last prune
step freezes that mask.  So the budget is reached by the threshold, never exceeded.
"""

from __future__ import annotations

import torch

from dora_lab.core.methods import AllocationMethod, Keep, keep_where, register_method


@register_method("sora")
class SoRA(AllocationMethod):
    follows_schedule = True
    exact_target = False  # the threshold may leave fewer than the cap

    def __init__(self, lam: float = 0.1, threshold: float = 0.0) -> None:
        if not lam > 0:
            raise ValueError(f"lam must be > 0 (the L1 weight), got {lam}")
        if lam >= 1:
            raise ValueError(
                f"lam = {lam} keeps nothing: the soft threshold lr * lam then cancels at least a whole "
                f"AdamW step on a gate (about lr), so every gate, starting at 0, stays 0; use lam below 1")
        if not 0 <= threshold < float("inf"):
            raise ValueError(f"threshold must be finite and >= 0 (a gate's |c| to keep), got {threshold}")
        self.lam = float(lam)
        self.threshold = float(threshold)

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        if optimizer is None:
            raise ValueError("method 'sora' needs the optimizer (its learning rate): call controller.step(optimizer)")
        lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            for name, layer in self.ctl.layers.items():
                if id(layer.c) not in lr_of:
                    raise ValueError(f"method 'sora': the optimizer does not hold layer {name!r}'s gates c")
                shrink = lr_of[id(layer.c)] * self.lam
                layer.c.copy_(layer.c.sign() * (layer.c.abs() - shrink).clamp_min(0.0))

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctl.schedule
        if not sched.is_prune_step(t):
            return None
        layers = self.ctl.layers
        keep = keep_where(layers, {n: layer.c.abs() for n, layer in layers.items()}, self.threshold,
                          sched.budget(t), self.ctl.cost)
        if sched.is_final_step(t) and not any(bool(k.any()) for k in keep.values()):
            raise RuntimeError(f"method 'sora' kept no component: every gate |c| is at or below threshold "
                               f"{self.threshold} (method.params.threshold); lower it or method.params.lam "
                               f"({self.lam})")
        return keep
