"""Load a saved adapter together with its base model: :func:`load_adapter` reads the adapter
(:func:`dora_lab.core.checkpoint.read_adapter`), loads the base model it names as training loaded
it (the Hub, a local folder or the known offline copy, :mod:`dora_lab.run.models`) unless you pass
one, and puts the adapter on it (:func:`dora_lab.core.checkpoint.apply_adapter`)::

    model = load_adapter("runs/x/adapter")                  # base loaded from the saved name
    model = load_adapter("runs/x/adapter", model=my_base)   # or onto a base you loaded

The adapter format itself (``save_adapter``, the file names, the errors) lives in the core, because
a training run writes it; its names are re-exported here, where the export tools and users import
them from (docs/export.md).
"""

from __future__ import annotations

import os

from torch import nn

from ..core.checkpoint import (
    ADAPTER_DIRNAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    MLFLOW_ADAPTER_TAG,
    WEIGHTS_NAME,
    AdapterError,
    AdapterFileError,
    AdapterMismatchError,
    AdapterSaveError,
    BaseModelError,
    apply_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from ..core.fingerprint import base_fingerprint

__all__ = [
    "ADAPTER_DIRNAME", "CONFIG_NAME", "FORMAT_VERSION", "MLFLOW_ADAPTER_TAG", "WEIGHTS_NAME",
    "AdapterError", "AdapterFileError", "AdapterMismatchError", "AdapterSaveError", "BaseModelError",
    "base_fingerprint", "load_adapter", "read_adapter_config", "save_adapter",
]


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
    the adapter was saved from a causal LM), after the adapter's files are checked.  Adapter and
    head parameters come back trainable, the rest frozen; the model's train/eval mode is not changed.
    ``check_base=False`` skips the fingerprint check (only for a base you know is right).
    """
    config, tensors = read_adapter(folder)
    if model is None:
        base_info = config["base_model"]
        model = _load_base(base_model or str(base_info["name_or_path"]), int(base_info["num_labels"]),
                           str(base_info.get("model_class") or ""))
    return apply_adapter(model, config, tensors, check_base=check_base)


def _load_base(name_or_path: str, num_labels: int, model_class: str = "") -> nn.Module:
    """The base as training loaded it: :func:`~dora_lab.run.models.resolve_model_path` picks the Hub,
    a local folder or the known offline copy (the fingerprint check refuses a wrong one).  A saved
    ``*ForCausalLM`` class loads with ``AutoModelForCausalLM``, anything else as a classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..run.models import resolve_model_path

    path, local_only = resolve_model_path(name_or_path)
    try:
        model: nn.Module
        if model_class.endswith("ForCausalLM") or model_class.endswith("LMHeadModel"):
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_only)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=local_only
            )
    except Exception as e:  # OSError, Hub/network and validation errors all end here
        raise BaseModelError(
            f"could not load the base model {name_or_path!r} ({type(e).__name__}: {e}). If the Hugging Face "
            f"Hub is unreachable, point at a local copy: load_adapter(folder, base_model='/path/to/model') "
            f"or `python -m dora_lab.export ... --base /path/to/model`, or load the base yourself and pass "
            f"model=...; with a cached copy, HF_HUB_OFFLINE=1 also works"
        ) from e
    return model
