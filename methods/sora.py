"""``sora``: sparse gates by a proximal L1 step (SoRA, Ding et al., EMNLP 2023).

dora_lab's ``c`` is SoRA's gate ``g``.  As in the official code (TsinghuaC3I/SoRA,
``src/sparse_optimizer.py``: ``SparseAdamW.step``), after every optimizer step, for the whole run,
each gate is soft-thresholded by a fixed ``xi`` (``sparse_lambda_2``; 3e-4 in its shipped
``run_glue_sora_no_schedule.sh``)::

    c <- sign(c) * max(|c| - xi, 0)

so a gate that reaches zero stays there until the loss gradient pulls it out again.  The step goes
on after the masks freeze (``acts_after_freeze``): the kept gates stay sparse in the second half of
a run, as in SoRA, which has no freeze at all.  ``lam`` (a departure, the old dora_lab rule and the
paper's eq. with the learning rate as step size) replaces ``xi`` by ``eta * lam``, ``eta`` the
current learning rate of ``c``'s parameter group.

The gates start as the official ``lora.py`` draws them (``gate_init: normal``): ``c ~ N(0, 1)``
with ``B = 0``, so the output starts unchanged; ``gate_init: zero`` (a departure) keeps the
adapter's own start, ``c = 0`` with ``A``, ``B`` drawn.

The rank is the number of non-zero gates: at the schedule's prune steps the components whose
``|c|`` is above ``threshold`` are kept, the budget ``b(t)`` as a cap (if more are above it, the
largest ``|c|`` that fit); the last prune step freezes that mask.  So the budget is reached by the
threshold, never exceeded.  The cap is dora_lab's (SoRA has none: its rank is whatever stays non-zero).
"""

from __future__ import annotations

import torch

from dora_lab.core.context import MethodContext
from dora_lab.core.methods import AllocationMethod, Keep, keep_where, register_method

GATE_INITS = ("normal", "zero")


@register_method("sora")
class SoRA(AllocationMethod):
    follows_schedule = True
    exact_target = False  # the threshold may leave fewer than the cap
    acts_after_freeze = True  # the proximal step runs at every optimizer step

    def __init__(self, xi: float = 3e-4, lam: float | None = None, threshold: float = 0.0,
                 gate_init: str = "normal") -> None:
        if not 0 < xi < float("inf"):
            raise ValueError(f"xi must be finite and > 0 (the fixed soft threshold per step), got {xi}")
        if lam is not None and not lam > 0:
            raise ValueError(f"lam must be > 0 (the L1 weight, shrink lr * lam per step) or null, got {lam}")
        if lam is not None and lam >= 1:
            raise ValueError(
                f"lam = {lam} keeps nothing: the soft threshold lr * lam then cancels at least a whole "
                f"AdamW step on a gate (about lr), so every gate, starting at 0, stays 0; use lam below 1")
        if not 0 <= threshold < float("inf"):
            raise ValueError(f"threshold must be finite and >= 0 (a gate's |c| to keep), got {threshold}")
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {', '.join(GATE_INITS)} (normal: the official c ~ N(0, 1) "
                             f"with B = 0; zero: the adapter's c = 0), got {gate_init!r}")
        self.xi = float(xi)
        self.lam = None if lam is None else float(lam)
        self.threshold = float(threshold)
        self.gate_init = gate_init

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        if self.gate_init == "normal":
            with torch.no_grad():
                for layer in ctx.layers.values():
                    layer.c.copy_(torch.randn(layer.c.shape, dtype=torch.float32).to(layer.c))
                    layer.B.zero_()

    def shrinks(self, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        """This step's soft threshold per layer: ``xi``, or ``eta * lam`` with ``eta`` the learning
        rate of the layer's ``c`` group."""
        layers = self.ctx.layers
        if self.lam is None:
            return dict.fromkeys(layers, self.xi)
        if optimizer is None:
            raise ValueError("method 'sora' with lam needs the optimizer (its learning rate): "
                             "call controller.step(optimizer)")
        lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, layer in layers.items() if id(layer.c) not in lr_of]
        if missing:
            raise ValueError(f"method 'sora': the optimizer does not hold layer {missing[0]!r}'s gates c")
        return {n: lr_of[id(layer.c)] * self.lam for n, layer in layers.items()}

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        if not update_scores:  # fp16 loss scaling skipped this optimizer step, and with it SparseAdamW's threshold
            return
        shrinks = self.shrinks(optimizer)
        with torch.no_grad():
            for name, layer in self.ctx.layers.items():
                layer.c.copy_(layer.c.sign() * (layer.c.abs() - shrinks[name]).clamp_min(0.0))

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        sched = self.ctx.schedule
        if not sched.is_prune_step(t):
            return None
        layers = self.ctx.layers
        keep = keep_where(layers, {n: layer.c.abs() for n, layer in layers.items()}, self.threshold,
                          sched.budget(t), self.ctx.cost)
        if sched.is_final_step(t) and not any(bool(k.any()) for k in keep.values()):
            raise RuntimeError(f"method 'sora' kept no component: every gate |c| is at or below threshold "
                               f"{self.threshold} (method.params.threshold); lower it or the shrink "
                               f"(method.params.xi = {self.xi}, lam = {self.lam})")
        return keep
