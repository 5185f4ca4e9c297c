"""Your own allocation method: a class with the controller's hooks, registered by name (docs/extending.md).

It sees the run through its context, ``self.ctx`` (``dora_lab.MethodContext``: the layers, the cost of a
component, the schedule, the step, the freeze), never the controller.

A plugin file: list it under ``plugins:`` and name it (``method: {name: grow_where_grad}``, with a
schedule that has prune steps); ``python -m dora_lab.study examples/tiny_study.yaml`` runs it against
``dora``.  One component per layer at first, then one more at each grow step where ``c``'s gradient
is largest, up to the target.
"""

import torch

from dora_lab import AllocationMethod, register_method


@register_method("grow_where_grad")
class GrowWhereGrad(AllocationMethod):
    """One component per layer at first; at each grow step one more where c's gradient is largest."""
    grows = True  # the schedule rises from start_budget() to the target, its cap
    pool = True  # inactive components are masked out; an added one is a fresh component

    def start_budget(self, pool):  # the layers and the budget's unit, before the schedule exists
        return sum(pool.cost(layer) for layer in pool.layers.values())

    def setup(self, ctx):
        super().setup(ctx)  # keeps it as self.ctx
        for layer in ctx.layers.values():
            layer.soft_prune(torch.arange(layer.rank) < 1)  # only component 0 active
            layer.hard_mask = True

    def decide(self, t, update_scores):
        if not (ctx := self.ctx).schedule.is_prune_step(t):
            return None
        keep = {n: layer.mask > 0 for n, layer in ctx.layers.items()}
        room = ctx.schedule.budget(t) - ctx.active_budget()
        for n in sorted(keep, key=lambda n: -float(ctx.layers[n].c.grad.norm())):
            free = torch.nonzero(~keep[n]).flatten()
            if len(free) and ctx.cost(ctx.layers[n]) <= room:
                keep[n][free[0]] = True
                room -= ctx.cost(ctx.layers[n])
        return keep
