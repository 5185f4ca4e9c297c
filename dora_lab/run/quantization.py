"""QLoRA: ``model.quantization`` loads the frozen base in 4 bits (bitsandbytes' NF4 or FP4 through
transformers' ``BitsAndBytesConfig``), with the adapters and the trained head in float32.

``model.quantization: {bits: 4, type: nf4, double_quant: true, compute_dtype: bfloat16}``:

- every ``nn.Linear`` of the base except the output head becomes a bitsandbytes ``Linear4bit``
  (weights packed two to a byte, one scale per 64 weights, the scales themselves quantised with
  ``double_quant``), frozen; embeddings, norms and the head keep ``model.dtype``;
- the 4-bit products run in ``compute_dtype``; the adapters' ``A``, ``B``, ``c`` and the trained head
  are float32 master weights (the same rule as ``model.dtype: bfloat16``), so the scorers, the
  optimizer and the saved adapter see only them: the dora_lab checkpoint holds the adapters and the
  head, never the quantised base;
- merging (:func:`~dora_lab.export.merge.merged_model`) dequantises the base first
  (:mod:`dora_lab.export.dequantize`): the merged model is the trained one, in full precision.

bitsandbytes is the optional extra ``qlora`` (``pip install 'dora_lab[qlora]'``); 0.45 and later
also run 4-bit layers on a CPU (slowly: the CPU backend dequantises each product).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config_yaml import ConfigError

if TYPE_CHECKING:  # torch is imported when used: the config module that imports this one stays light
    import torch

__all__ = ["QuantizationConfig", "is_quantized", "quantized_load_kwargs", "standard_layout"]


class QuantizationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    bits: Literal[4] = Field(4, description="bits per frozen base weight (4: QLoRA)")
    type: Literal["nf4", "fp4"] = Field("nf4", description="the 4-bit code: nf4 (QLoRA's NormalFloat) or fp4")
    double_quant: bool = Field(True, description="quantise the per-block scales too (about 0.4 bits a weight less)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the 4-bit layers' products")

    def bnb_config(self) -> Any:
        """transformers' ``BitsAndBytesConfig`` for these settings."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype))


def quantized_load_kwargs(quantization: QuantizationConfig | None, device: torch.device,
                          method: str = "adapter") -> dict[str, Any]:
    """The ``from_pretrained`` keywords that load the base quantised on ``device`` (``{}`` without
    ``quantization``).  Refuses, with :class:`ConfigError` naming the fix, before anything is loaded:
    a machine without bitsandbytes, and ``train.method: full`` (4-bit weights cannot be trained)."""
    if quantization is None:
        return {}
    if method != "adapter":
        raise ConfigError(f"model.quantization freezes the base in 4 bits, so train.method {method!r} cannot "
                          f"train it: set train.method to adapter (QLoRA), or remove model.quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization needs bitsandbytes, which is not installed: pip install "
                          "'dora_lab[qlora]' (or pip install bitsandbytes), or remove model.quantization")
    return {"quantization_config": quantization.bnb_config(), "device_map": {"": str(device)}}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit layers."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def standard_layout(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout: on a CPU with bf16
    instructions, a ``Linear4bit`` run in eval mode otherwise repacks its weight once for a kernel
    that rounds the inputs to bf16 whatever ``compute_dtype`` says (training, in train mode, never
    does), so evaluation would compute another model than training and merging.  Returns how many."""
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    for m in layers:
        setattr(m, "support_avx512bf16_for_cpu", False)  # noqa: B010  (a bitsandbytes attribute mypy cannot see)
    return len(layers)
