"""A plugin file, imported by ``tests/conftest.py`` through :func:`dora_lab.import_plugins`.

It registers one class-based scorer and one schedule the way a user's plugin would; the shared
matrix (every test taking ``scorer_name`` / ``schedule_name``) then runs them like the built-ins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dora_lab import Scorer, register_schedule, register_scorer


@register_scorer("plugin_movement")
class Movement(Scorer):
    """Accumulated first-order importance of ``c``: ``sum_t |c_i grad(c_i)|`` (class-based API)."""

    needs_grad = True

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.total: dict[str, torch.Tensor] = {}

    def update(self, layers: Mapping[str, Any]) -> None:
        for name, layer in layers.items():
            s = self.scale * (layer.c.detach() * layer.c.grad).abs().float()
            prev = self.total.get(name)
            self.total[name] = s if prev is None or prev.shape != s.shape else prev + s

    def scores(self) -> dict[str, torch.Tensor]:
        return dict(self.total)

    def state_dict(self) -> dict[str, Any]:
        return {"total": {k: v.clone() for k, v in self.total.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = {k: v.clone() for k, v in state["total"].items()}


@register_schedule("plugin_cosine")
def cosine(p: float, start: int, target: int) -> int:
    return target + int((start - target) * (1 + math.cos(math.pi * p)) / 2)
