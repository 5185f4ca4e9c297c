"""Evaluation: predictions in the loader's order, put back in the data's order, then metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .tasks import TaskSpec, compute_metrics

__all__ = ["evaluate", "predict"]


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device, autocast: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every example, in the data's original order."""
    model.eval()
    logits, labels, order = [], [], []
    for batch in loader:
        index = batch["index"]
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("index", "labels")}
        with autocast:
            out = model(**inputs).logits
        logits.append(out.float().cpu())
        labels.append(batch["labels"])
        order.append(index)
    idx = torch.cat(order).argsort()
    return torch.cat(logits)[idx].numpy(), torch.cat(labels)[idx].numpy()


def evaluate(
    model: nn.Module, loaders: Mapping[str, Any], spec: TaskSpec, device: torch.device, autocast: Any
) -> dict[str, float]:
    """Metrics on every evaluation split: plain keys for the first, ``split/key`` for the others."""
    out: dict[str, float] = {}
    for i, (split, loader) in enumerate(loaders.items()):
        preds, labels = predict(model, loader, device, autocast)
        for key, value in compute_metrics(spec, preds, labels).items():
            out[key if i == 0 else f"{split}/{key}"] = float(value)
    return out
