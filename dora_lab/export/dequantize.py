"""A 4-bit (bitsandbytes ``Linear4bit``) model made full precision again, so an adapter trained on a
QLoRA base (``model.quantization``) merges into the weights it was trained against.

:func:`dequantize_model` replaces every ``Linear4bit`` (inside an adapter layer or not) with an
``nn.Linear`` holding ``bitsandbytes.functional.dequantize_4bit`` of its weight (the matrix the
4-bit layer multiplies by), in ``dtype``.  :func:`~dora_lab.export.merge.merged_model`
calls it on a quantised model before merging; merging into a 4-bit weight in place is not
possible (the update would be rounded to 4 bits, mostly away).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["dequantize_model", "dequantized_linear"]


def dequantized_linear(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An ``nn.Linear`` holding the dequantised weight of the 4-bit ``layer`` (and its bias), frozen.

    ``dequantize_4bit`` reads bitsandbytes' standard layout.  On a CPU with bf16 instructions a
    ``Linear4bit`` that has run in eval mode repacks its weight for its own bf16 kernel
    (``quant_state.packing_format_for_cpu``; dora_lab's loading turns that off:
    :func:`~dora_lab.run.quantization.standard_layout`); such a layer's matrix is read by running it
    on the identity instead: what it computes, up to the kernel's bf16 rounding of the input."""
    from bitsandbytes.functional import dequantize_4bit

    assert isinstance(layer, nn.Linear)
    weight = layer.weight
    with torch.no_grad():
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # type: ignore[attr-defined]
            eye = torch.eye(layer.in_features, device=weight.device)
            full = torch.cat([layer(eye[i:i + 1024]).float() for i in range(0, layer.in_features, 1024)]).t()
            full = full - (layer.bias.float()[:, None] if layer.bias is not None else 0.0)
        else:
            full = dequantize_4bit(weight.data, weight.quant_state)  # type: ignore[attr-defined]
        full = full.to(dtype).reshape(layer.out_features, layer.in_features)
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                        device=full.device)
        out.weight.copy_(full)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.to(dtype))
    out.requires_grad_(False)
    return out


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace, in place, every 4-bit layer of ``model`` with its :func:`dequantized_linear`; the
    model's config no longer says it is quantised (so ``save_pretrained`` writes a plain model).
    Returns how many layers were replaced."""
    names = [name for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantized_linear(parent.get_submodule(child), dtype))
    if names:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        for attr, value in (("is_quantized", False), ("hf_quantizer", None), ("quantization_method", None)):
            if hasattr(model, attr):
                with contextlib.suppress(AttributeError):  # a read-only property on some transformers versions
                    setattr(model, attr, value)
        model.to(dtype)
    return len(names)
