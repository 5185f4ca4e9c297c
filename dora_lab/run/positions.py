"""A model's sequence-length limit, from its config (``max_position_embeddings``, ``n_positions``,
``n_ctx``), its learned position table of any name and its tokenizer: :func:`sequence_limit`, and the
refusal of a longer ``task.max_length`` before any work (:func:`check_max_length`)."""

from __future__ import annotations

from typing import Any

import torch

from .config_yaml import ConfigError

__all__ = ["POSITION_KEYS", "check_max_length", "sequence_limit"]

# A tokenizer saved without a limit reports transformers' VERY_LARGE_INTEGER (1e30): no limit.
_NO_LIMIT = 10**9

#: Config keys that bound a model's positions (GPT-2 saves ``n_positions`` and, in older files, ``n_ctx``).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def _is_position_table(name: str, module: torch.nn.Module) -> bool:
    """A learned position table, whatever its name: BERT's ``position_embeddings``, GPT-2's ``wpe``,
    OPT's ``embed_positions`` (an ``nn.Embedding`` subclass with its own ``offset``), ..."""
    last = name.rsplit(".", 1)[-1].lower()
    return isinstance(module, torch.nn.Embedding) and (
        last == "wpe" or "position" in last or "pos_emb" in last or last.startswith("embed_pos"))


def _table_bound(model: torch.nn.Module) -> tuple[int, int, int | None, str] | None:
    """``(positions, rows, padding_idx, module name)`` of the first learned position table: its rows
    less the ones before position 0 (RoBERTa: ``padding_idx + 1``; OPT: its ``offset`` of 2)."""
    for name, module in model.named_modules():
        if _is_position_table(name, module):
            assert isinstance(module, torch.nn.Embedding)
            offset = getattr(module, "offset", None)
            if not isinstance(offset, int):
                offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - offset, module.num_embeddings, module.padding_idx, name
    return None


def _config_bound(config: Any) -> tuple[int, str] | None:
    """The smallest of :data:`POSITION_KEYS` saved in ``config`` (the bound of rotary models, which
    have no table), as ``(value, key)``."""
    saved = config.to_dict() if hasattr(config, "to_dict") else {}
    found = [(v, k) for k in POSITION_KEYS if isinstance(v := saved.get(k), int) and v > 0]
    return min(found) if found else None


def sequence_limit(model: torch.nn.Module, tokenizer: Any) -> tuple[int, list[str]] | None:
    """The most tokens ``model`` and ``tokenizer`` take, with where each bound comes from, or None
    when nothing sets one.

    The model's bound is the smaller of its config's position limit (:data:`POSITION_KEYS`: the
    only bound of rotary models such as Llama, whose positions past it are untrained) and its
    learned position table (:func:`_is_position_table`) less the rows before the first position:
    RoBERTa-style models number positions from ``padding_idx + 1``, so 514 rows hold 512 positions;
    OPT's table has 2 extra rows.  The tokenizer's is ``model_max_length`` when it is set (a GGUF
    conversion loses it, hence the config).
    """
    bounds: list[tuple[int, str]] = []
    config = _config_bound(getattr(model, "config", None))
    table = _table_bound(model)
    if table is not None and (config is None or table[0] < config[0]):
        positions, rows, padding_idx, name = table
        key = f"config.{config[1]} {rows}" if config is not None and config[0] == rows else \
            f"position table {name} of {rows} rows"
        how = f" minus {rows - positions} (positions start after padding_idx {padding_idx})" \
            if padding_idx is not None and rows > positions else \
            (f" minus {rows - positions} (rows before position 0)" if rows > positions else "")
        bounds.append((positions, key + how))
    elif config is not None:
        bounds.append((config[0], f"config.{config[1]} {config[0]}"))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        bounds.append((limit, f"tokenizer.model_max_length {limit}"))
    if not bounds:
        return None
    return min(n for n, _ in bounds), [why for _, why in bounds]


def check_max_length(max_length: int, model: torch.nn.Module, tokenizer: Any, name: str) -> None:
    """Raise :class:`~dora_lab.run.config_yaml.ConfigError` when ``max_length`` exceeds
    :func:`sequence_limit`: longer inputs would fail mid-run with a tensor-size error."""
    found = sequence_limit(model, tokenizer)
    if found is None or max_length <= found[0]:
        return
    limit, why = found
    raise ConfigError(
        f"task.max_length={max_length} is longer than model {name!r} takes: at most {limit} tokens "
        f"({'; '.join(why)}). Set task.max_length to {limit} or less (--set task.max_length={limit})"
    )
