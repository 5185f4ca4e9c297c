"""Merge adapters into their base weights for inference at the base model's cost.

``merge_adapters`` / ``unmerge_adapters`` flip every layer in place (explicit calls, never hidden
in ``train()``/``eval()``).  ``merged_model`` returns a plain model, the ``RankOneLinear`` wrappers
replaced by their base ``nn.Linear`` (or ``Conv1D``) holding ``W0 + dW``, ready for ``save_pretrained``::

    plain = merged_model(model)          # model itself is left as it was
    plain.save_pretrained("out/merged")  # loads with AutoModelForSequenceClassification

The merged model computes what the adapted model computes in eval mode (adapter dropout is gone).
"""

from __future__ import annotations

import copy

from torch import nn

from ..core.adapter import adapter_layers
from ..run.quantization import is_quantized

__all__ = ["merge_adapters", "merged_model", "unmerge_adapters"]


def merge_adapters(model: nn.Module) -> int:
    """Add every adapter's ``dW`` into its base weight; returns how many layers were merged now."""
    if is_quantized(model):
        raise ValueError("the base is quantised to 4 bits (model.quantization): dW cannot be added into it in "
                         "place; use merged_model(model), which merges into a dequantised copy")
    done = 0
    for layer in adapter_layers(model).values():
        if not layer.merged:
            layer.merge()
            done += 1
    return done


def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters`; returns how many layers were unmerged now."""
    done = 0
    for layer in adapter_layers(model).values():
        if layer.merged:
            layer.unmerge()
            done += 1
    return done


def merged_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A model without adapter layers: each ``RankOneLinear`` becomes its merged base layer.

    Works on a deep copy unless ``inplace`` (which saves memory for a model you will not train on).
    Every parameter of the result is frozen; put it back with ``requires_grad_`` to fine-tune it.
    """
    out = model if inplace else copy.deepcopy(model)
    if is_quantized(out):  # a QLoRA base: merge into its dequantised weights (dora_lab.export.dequantize)
        from .dequantize import dequantize_model

        dequantize_model(out)
    for name, layer in adapter_layers(out).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, layer.base)
    for p in out.parameters():
        p.requires_grad_(False)
    return out
