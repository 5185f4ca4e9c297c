"""The validation loss a validation scorer (``alora``) reads: one fixed sample of a task's
evaluation split, and the same loss with each of many components masked out.

``ValidationLoss(model, batches, autocast)()`` is the model's mean loss over ``batches`` as one
batch would give it (each batch weighted by what the model averages over: its rows, or for a
causal task its predicted tokens), in eval mode, without gradients, under the run's autocast, then
back in train mode.  ``.without(drops)`` is that loss with component ``drops[k]`` masked out, for
every ``k``, and ``.alone(drops, layers)`` with ``drops[k]`` the only component of ``layers``,
computed on stacked copies of each batch (:func:`~dora_lab.core.adapter.dropped.
dropped_per_copy`), ``max_rows`` rows a forward; each copy's loss is the task's loss on its slice of
the logits (cross-entropy, mean squared error for a regression head, token cross-entropy past the
first position for a causal LM: what the models' own ``loss`` computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core.adapter import RankOneLinear
from ..core.adapter.dropped import dropped_per_copy
from ..core.labels import IGNORE_INDEX

__all__ = ["ValidationLoss", "slice_loss"]


def slice_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The loss a Hugging Face head computes from ``logits`` and ``labels``: token labels (2-D, a
    causal LM) -> cross-entropy of each position's prediction of the next label, ``-100`` ignored;
    float labels -> mean squared error (a regression head); else cross-entropy."""
    if labels.dim() == 2:  # float32, as transformers' ForCausalLMLoss upcasts
        logits = logits.float()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     ignore_index=IGNORE_INDEX))
    if logits.dtype in (torch.float16, torch.bfloat16):  # a head's loss runs in float32 under autocast
        logits = logits.float()
    if labels.is_floating_point():
        return float(F.mse_loss(logits.reshape(len(labels), -1).squeeze(-1), labels.to(logits.dtype)))
    return float(F.cross_entropy(logits.reshape(len(labels), -1), labels))


class ValidationLoss:
    def __init__(self, model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], autocast: Any,
                 max_rows: int = 256) -> None:
        self.model, self.batches, self.autocast, self.max_rows = model, list(batches), autocast, max_rows
        self.weights = [float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) if b["labels"].dim() == 2
                        else float(len(b["labels"])) for b in self.batches]
        self.total = sum(self.weights)

    @torch.no_grad()
    def __call__(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast:
                return sum(w * float(self.model(**b).loss) for w, b in zip(self.weights, self.batches, strict=True)
                           ) / self.total
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def without(self, drops: Sequence[tuple[RankOneLinear, int]]) -> list[float]:
        """The loss with component ``drops[k]`` (a layer, a slot) masked out, for each ``k``."""
        return self._per_copy(drops, None)

    def alone(self, drops: Sequence[tuple[RankOneLinear, int]], layers: Sequence[RankOneLinear]) -> list[float]:
        """The loss with component ``drops[k]`` the only one of all adapter ``layers``, for each ``k``."""
        return self._per_copy(drops, layers)

    @torch.no_grad()
    def _per_copy(self, drops: Sequence[tuple[RankOneLinear, int]],
                  alone_in: Sequence[RankOneLinear] | None) -> list[float]:
        was_training = self.model.training
        self.model.eval()
        losses = [0.0] * len(drops)
        try:
            for weight, batch in zip(self.weights, self.batches, strict=True):
                rows = len(batch["labels"])
                per = max(1, self.max_rows // rows)
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                for start in range(0, len(drops), per):
                    chunk = drops[start : start + per]
                    stacked = {k: v.repeat(len(chunk), *([1] * (v.dim() - 1))) for k, v in inputs.items()}
                    with self.autocast, dropped_per_copy(chunk, rows, alone_in):
                        logits = self.model(**stacked).logits
                    for k in range(len(chunk)):
                        losses[start + k] += weight * slice_loss(logits[k * rows : (k + 1) * rows], batch["labels"])
        finally:
            self.model.train(was_training)
        return [loss / self.total for loss in losses]
