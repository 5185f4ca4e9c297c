"""AdamW with the usual no-decay groups, and the learning-rate schedule as a pure function."""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter.layer import RankOneLinear
from .config import TrainConfig

__all__ = ["build_optimizer", "lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Phase 1, warm-up (the first ``warmup_ratio * total_steps`` steps): linear from 0 to 1.
    Phase 2, decay (the rest): linear from 1 down to 0 at ``total_steps``.
    """
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters.  Biases and LayerNorm weights get no weight decay;
    the head (everything trainable outside the adapters) may have its own ``head_lr``."""
    adapter_ids = {
        id(p) for m in model.modules() if isinstance(m, RankOneLinear) for p in (m.A, m.B, m.c)
    }
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 and id(p) not in adapter_ids
        is_head = id(p) not in adapter_ids and cfg.method == "adapter"
        groups.setdefault((no_decay, is_head), []).append(p)
    param_groups = [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr": (cfg.head_lr or cfg.lr) if is_head else cfg.lr,
        }
        for (no_decay, is_head), params in groups.items()
    ]
    if not param_groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(param_groups, lr=cfg.lr)
