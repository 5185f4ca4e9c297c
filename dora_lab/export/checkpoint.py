"""Load a saved adapter together with its base model: :func:`load_adapter` reads the adapter
(:func:`dora_lab.core.checkpoint.read_adapter`), loads the base model it names as training loaded
it (the Hub, a local folder or the known offline copy, :mod:`dora_lab.run.models`) unless you pass
one, and puts the adapter on it (:func:`dora_lab.core.checkpoint.apply_adapter`)::

    model = load_adapter("runs/x/adapter")                  # base loaded from the saved name
    model = load_adapter("runs/x/adapter", model=my_base)   # or onto a base you loaded

The adapter format itself (``save_adapter``, ``read_adapter_config``, the file names, the
``AdapterError``s) lives in the core, :mod:`dora_lab.core.checkpoint`, because a training run writes
it; import those names from there (docs/export.md).  Only loading the *base model* an adapter names
is export's own: it needs :mod:`dora_lab.run.models`, which the core must not import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import BaseModelError, apply_adapter, read_adapter

__all__ = ["load_adapter"]


def load_adapter(
    folder: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    base_model: str | None = None,
    check_base: bool = True,
) -> nn.Module:
    """Load the adapter in ``folder`` onto ``model`` (a plain base model, changed in place).

    With ``model=None`` the base is loaded with ``AutoModelForSequenceClassification
    .from_pretrained(base_model or the saved name, num_labels=...)`` (``AutoModelForCausalLM`` when
    the adapter was saved from a causal LM), after the adapter's files are checked; a QLoRA run's base
    (its saved config's ``model.quantization``) is loaded in 4 bits again, the base its adapter
    trained on, so :func:`~dora_lab.export.merge.merged_model` merges into its dequantised copy.  Adapter and
    head parameters come back trainable, the rest frozen; the model's train/eval mode is not changed.
    ``check_base=False`` skips the fingerprint check (only for a base you know is right).
    """
    config, tensors = read_adapter(folder)
    if model is None:
        base_info = config["base_model"]
        model = _load_base(base_model or str(base_info["name_or_path"]), int(base_info["num_labels"]),
                           str(base_info.get("model_class") or ""), _quantization(config), config["head"])
    return apply_adapter(model, config, tensors, check_base=check_base)


def _quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``model.quantization`` block of the run that saved the adapter (``None``: a full-precision base)."""
    model = ((config.get("extra") or {}).get("config") or {}).get("model") or {}
    return model.get("quantization") or None


def _load_base(name_or_path: str, num_labels: int, model_class: str = "",
               quantization: dict[str, Any] | None = None, head: Sequence[str] = ()) -> nn.Module:
    """The base as training loaded it: :func:`~dora_lab.run.models.resolve_model_path` picks the Hub,
    a local folder or the known offline copy (the fingerprint check refuses a wrong one).  A saved
    ``*ForCausalLM`` class loads with ``AutoModelForCausalLM``, anything else as a classifier.  Loaded
    through :func:`~dora_lab.run.load_report.load_pretrained` (no LOAD REPORT table; one ``warning:``
    line for keys missing or unexpected outside the new head and the adapter's saved ``head``
    parameters, which :func:`~dora_lab.core.checkpoint.apply_adapter` puts back)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..run.load_report import load_pretrained
    from ..run.models import resolve_model_path

    path, local_only = resolve_model_path(name_or_path)
    quantized: dict[str, Any] = {}
    if quantization is not None:  # refused (ConfigError naming the fix) without bitsandbytes
        from ..run.quantization import QuantizationConfig, quantized_load_kwargs

        quantized = quantized_load_kwargs(QuantizationConfig(**quantization), torch.device("cpu"))
    try:
        causal = model_class.endswith(("ForCausalLM", "LMHeadModel"))
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        modules = sorted({n.rsplit(".", 1)[0] for n in head})  # the saved parameters' modules (model.trainable)
        model: nn.Module = load_pretrained(auto, path, name_or_path, causal=causal, trainable=modules,
                                           local_files_only=local_only, **({} if causal else {"num_labels": num_labels}),
                                           **quantized)
    except Exception as e:  # OSError, Hub/network and validation errors all end here
        raise BaseModelError(
            f"could not load the base model {name_or_path!r} ({type(e).__name__}: {e}). If the Hugging Face "
            f"Hub is unreachable, point at a local copy: load_adapter(folder, base_model='/path/to/model') "
            f"or `python -m dora_lab.export ... --base /path/to/model`, or load the base yourself and pass "
            f"model=...; with a cached copy, HF_HUB_OFFLINE=1 also works"
        ) from e
    if quantized:
        from ..run.quantization import standard_layout

        standard_layout(model)  # the layout training kept (bitsandbytes' CPU repacking off)
    return model
