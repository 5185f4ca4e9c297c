"""``sensitivity``: first-order Taylor importance ``I(theta) = |theta * grad(theta)|`` (AdaLoRA's
raw score, before smoothing), combined per component as
``I(c_i) + mean_j I(A[i,j]) + mean_j I(B[j,i])``.  No smoothing by default (``beta`` adds an EMA).
"""

from __future__ import annotations

import torch

from dora_lab.core.adapter.layer import RankOneLinear
from dora_lab.core.scorers import combine_elementwise, register_scorer, require_grads


@register_scorer("sensitivity", needs_grad=True, batched=True)
def sensitivity(component: RankOneLinear) -> torch.Tensor:
    ga, gb, gc = require_grads(component, "sensitivity")
    return combine_elementwise(
        (component.A * ga).abs(), (component.B * gb).abs(), (component.c * gc).abs()
    )
