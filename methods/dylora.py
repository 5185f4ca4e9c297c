"""``dylora``: train a random prefix of the components each step (DyLoRA, Valipour et al., EACL 2023).

Before each optimizer step a prefix length ``b ~ U{1, ..., r}`` is drawn (one ``b`` for every layer,
from a generator seeded by ``seed`` and the step, so data-parallel ranks draw alike); the forward
pass uses only the components at stored positions ``< b`` (``RankOneLinear.prefix``), so only they
get gradients.  Every prefix is trained to work alone, so any rank can be cut afterwards.  At the
schedule's last prune step each layer is cut to a prefix that meets the target: ``k`` components
per layer, the largest ``k`` whose total fits, then one more for layers in order while it fits;
the mask is frozen there.  Evaluation (``model.eval()``) uses every component until the cut.
"""

from __future__ import annotations

import torch

from dora_lab.core.context import MethodContext
from dora_lab.core.methods import AllocationMethod, Keep, register_method, uniform_prefix


@register_method("dylora")
class DyLoRA(AllocationMethod):
    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.draws: list[int] = []  # the prefix drawn for each step (for tests and reports)

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        self._draw(0)

    def _draw(self, t: int) -> None:
        r = max(layer.rank for layer in self.ctx.layers.values())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        b = int(torch.randint(1, r + 1, (), generator=g))
        self.draws.append(b)
        for layer in self.ctx.layers.values():
            layer.prefix = b

    def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
        if t + 1 <= self.ctx.schedule.end_step:
            self._draw(t + 1)

    def decide(self, t: int, update_scores: bool) -> Keep | None:
        if t != self.ctx.schedule.end_step:
            return None
        return uniform_prefix(self.ctx.layers, self.ctx.target, self.ctx.cost)

    def is_final(self, t: int) -> bool:
        return t == self.ctx.schedule.end_step

    def after_apply(self, t: int, keep: Keep) -> None:
        for layer in self.ctx.layers.values():
            layer.prefix = None

    @property
    def changes_allocation(self) -> bool:
        return True  # the cut at the schedule's end step, whatever its curve

    def budget(self, t: int) -> int:
        return self.ctx.capacity if t < self.ctx.schedule.end_step else self.ctx.target

    def phase(self, t: int) -> str:
        return "decay" if t <= self.ctx.schedule.end_step else "final"

    def state_dict(self) -> dict[str, object]:
        return {"draws": list(self.draws)}

    def load_state_dict(self, state) -> None:  # type: ignore[no-untyped-def]
        self.draws = list(state.get("draws", []))
        if self.draws and not self.ctx.frozen:
            for layer in self.ctx.layers.values():
                layer.prefix = self.draws[-1]
