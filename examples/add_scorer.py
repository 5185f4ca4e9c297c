"""Your own importance scorer: one function, registered by name (docs/extending.md).

A plugin file: list it under ``plugins:`` in a config (tiny_run.yaml does) and name the scorer
(``scorer: {name: weight_norm}``); ``python -m dora_lab.train examples/tiny_run.yaml`` runs it.
"""

import torch

from dora_lab import RankOneLinear, register_scorer


@register_scorer("weight_norm")
def weight_norm(component: RankOneLinear) -> torch.Tensor:
    """|c_i| ||B[:, i]|| ||A[i, :]||: the size of component i's update (weights only)."""
    return component.c.abs() * component.B.norm(dim=0) * component.A.norm(dim=1)
