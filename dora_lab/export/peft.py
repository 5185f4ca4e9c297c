"""Export an adapted model as a PEFT LoRA adapter folder (``peft.PeftModel.from_pretrained`` loads it).

dora_lab's update of a layer is ``dW = (alpha/r0) B diag(c m) A``; PEFT LoRA's is
``dW = (lora_alpha_i / r_i) lora_B @ lora_A``.  Each layer is exported with its components that
contribute (mask 1; with a soft mask also any with ``c != 0``, as the forward pass uses them), so
``r_i`` is its final rank; ``lora_alpha_i = r_i`` makes PEFT's scaling exactly 1, and the component
scale ``(alpha/r0) c_i m_i`` is folded into the columns of ``lora_B``.  Layers left with no
component are not targeted at all.  GPT-2's ``Conv1D`` layers export the same ``lora_A``/``lora_B``
with ``fan_in_fan_out: true`` (PEFT then transposes ``dW`` for the stored ``d_in x d_out`` weight);
``task_type`` is ``SEQ_CLS`` for a classifier, ``CAUSAL_LM`` for a causal LM.

The folder follows peft 0.21's format (``peft/utils/save_and_load.py``, ``peft/tuners/lora``;
tested with 0.21.2).  Module names are exact full names: peft's pattern lookup matches a full name
as itself (older releases fall back to an exact lookup), and ``target_modules`` by equality:

    adapter_config.json         peft_type LORA; r / lora_alpha: the most common rank;
                                rank_pattern / alpha_pattern: {full module name: r_i} for the
                                others; target_modules: the full names of layers with r_i > 0;
                                modules_to_save: the trained head modules
    adapter_model.safetensors   base_model.model.<layer>.lora_A.weight   (r_i x d_in)
                                base_model.model.<layer>.lora_B.weight   (d_out x r_i)
                                base_model.model.<head module>.<param>   (modules_to_save)

peft itself is not needed to export (it is an optional extra: ``pip install dora_lab[peft]``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.adapter import RankOneLinear, adapter_layers

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "export_peft", "lora_factors"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@torch.no_grad()
def lora_factors(layer: RankOneLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` with ``lora_B @ lora_A == layer.delta_weight()``; only contributing components."""
    c = layer.effective_c()
    # a soft mask is not applied in the forward pass, and a reserve acts with its gate: keep what c uses
    keep = (layer.mask > 0) | (c != 0)
    idx = torch.nonzero(keep, as_tuple=False).flatten()
    lora_a = layer.A.index_select(0, idx)
    lora_b = layer.B.index_select(1, idx) * (c.index_select(0, idx) * layer.scale)
    return lora_a.detach().contiguous(), lora_b.detach().contiguous()


def export_peft(model: nn.Module, folder: str | os.PathLike[str], *, base_model: str) -> Path:
    """Write ``model``'s adapters and trainable head to ``folder`` as a PEFT LoRA adapter.

    ``base_model`` (Hub id or path) is recorded as ``base_model_name_or_path``.  Load with
    ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_model,
    num_labels=...), folder)`` (``AutoModelForCausalLM`` for a causal LM); the logits equal
    dora_lab's in eval mode.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter layers (RankOneLinear): nothing to export")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        lora_a, lora_b = lora_factors(layer)
        if lora_a.shape[0] == 0:
            continue  # rank 0: left out of target_modules, the base layer stays as it is
        ranks[name] = int(lora_a.shape[0])
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_b
    if not ranks:
        raise ValueError("every adapter layer has rank 0: there is no update to export (the base model is it)")

    head_modules = _head_modules(model, layers)
    modules = dict(model.named_modules())
    for mod_name in head_modules:
        for pname, t in modules[mod_name].state_dict().items():
            tensors[f"{_PREFIX}{mod_name}.{pname}"] = t
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    first = next(iter(layers.values()))
    dropout = float(first.dropout.p) if isinstance(first.dropout, nn.Dropout) else 0.0
    kinds = {layer.fan_in_fan_out for name, layer in layers.items() if name in ranks}
    if len(kinds) > 1:
        raise ValueError("the adapted layers mix nn.Linear and Conv1D; PEFT's fan_in_fan_out is one flag for all "
                         "of them: export the two kinds separately")
    fan_in_fan_out = kinds.pop()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": str(base_model),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": head_modules or None,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type for the model's class: ``SEQ_CLS`` for a classifier, ``CAUSAL_LM`` for a
    causal LM (``*ForCausalLM``, GPT-2's ``GPT2LMHeadModel``), else none (a plain ``PeftModel``)."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def _head_modules(model: nn.Module, layers: dict[str, RankOneLinear]) -> list[str]:
    """Names of the modules that own trainable parameters outside the adapters (the task head)."""
    adapter_ids = {id(p) for layer in layers.values() for p in (layer.A, layer.B, layer.c)}
    names: list[str] = []
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in adapter_ids:
            continue
        mod_name = pname.rpartition(".")[0]
        if any(mod_name == n or mod_name.startswith(n + ".") for n in layers):
            raise ValueError(
                f"{pname} is trainable inside an adapted layer; PEFT cannot save it next to LoRA weights: "
                f"freeze it or merge it into the head"
            )
        if mod_name not in names:
            names.append(mod_name)
    return names
