"""``smoothed_uncertainty``: AdaLoRA's score.  Per element, with ``I = |theta * grad|``::

    Ibar <- beta1 Ibar + (1 - beta1) I
    Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|     (the Ibar just updated)
    score = Ibar * Ubar

combined per component like ``sensitivity``.  The EMAs start at zero, as in PEFT's RankAllocator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dora_lab.core.scorers import Layers, Scorer, combine_elementwise, register_scorer, require_grads


@register_scorer("smoothed_uncertainty")
class SmoothedUncertainty(Scorer):
    needs_grad = True

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"smoothed_uncertainty: {key} must be in [0, 1), got {value}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.ibar: dict[str, list[torch.Tensor]] = {}
        self.ubar: dict[str, list[torch.Tensor]] = {}

    def update(self, layers: Layers) -> None:
        with torch.no_grad():
            for name, layer in layers.items():
                grads = require_grads(layer, "smoothed_uncertainty")
                params = (layer.A, layer.B, layer.c)
                if name not in self.ibar or self.ibar[name][0].shape != layer.A.shape:
                    self.ibar[name] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
                    self.ubar[name] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
                for k, (p, g) in enumerate(zip(params, grads, strict=True)):
                    i = (p.float() * g.float()).abs()
                    ib = self.ibar[name][k].mul_(self.beta1).add_(i, alpha=1 - self.beta1)
                    self.ubar[name][k].mul_(self.beta2).add_((i - ib).abs(), alpha=1 - self.beta2)

    def scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.ibar:
            a, b, c = (ib * ub for ib, ub in zip(self.ibar[name], self.ubar[name], strict=True))
            out[name] = combine_elementwise(a, b, c)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ibar": {k: [t.clone() for t in v] for k, v in self.ibar.items()},
                "ubar": {k: [t.clone() for t in v] for k, v in self.ubar.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ibar = {k: [t.clone() for t in v] for k, v in state["ibar"].items()}
        self.ubar = {k: [t.clone() for t in v] for k, v in state["ubar"].items()}
