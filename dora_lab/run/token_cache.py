"""Tokenised splits cached once per study: its trials and workers read them instead of re-reading
and re-tokenising the data.

:func:`encoded_splits` returns the token rows (:class:`~dora_lab.run.batching.Encoded`) of ``train``
(as training batches them) and of each evaluation split (as evaluation scores them).  With a cache
folder (a study passes ``<study folder>/cache``) they are read from
``<cache>/tokens-<task>-<key>.json`` when that file exists; otherwise the rows are loaded
(:func:`~dora_lab.run.data.load_splits`), tokenised once and written there atomically (a temporary
file renamed into place, so a worker never reads half a file; two workers that miss at once both
tokenise and the second rename wins with the same bytes).

The key (:func:`cache_key`) is a SHA-256 of everything the token rows depend on: the tokenizer
(its name, class, and a hash of its full definition: the fast tokenizer's JSON, or else its vocabulary,
plus its special tokens, padding side and chat template), the task, ``max_length``,
``prompt_format``, ``task.columns``, the data source (the Hub dataset's name, or the local folder's
path with each file's name, size and modification time) and the sample limits (with the seed, which
picks the subset, only when a limit is set).  A changed file or tokenizer gives a new key, so a stale
cache is never read.  The file is JSON (token ids and labels), not a pickle: reading it runs no code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .batching import Encoded, encode_rows
from .causal import CausalEncoding
from .config import RunConfig
from .data import load_splits
from .rows import Row
from .tasks import TaskSpec

__all__ = ["CACHE_VERSION", "cache_key", "cache_path", "encoded_splits", "load_rows", "tokenizer_fingerprint"]

#: Bumped when the cached layout or the tokenisation rules change, so old files are not read.
CACHE_VERSION = 1


def load_rows(cfg: RunConfig, spec: TaskSpec) -> dict[str, list[Row]]:
    """The config's rows of every split (:func:`~dora_lab.run.data.load_splits` with ``cfg.task``'s keys)."""
    t = cfg.task
    return load_splits(spec, t.data_dir, max_train_samples=t.max_train_samples,
                       max_eval_samples=t.max_eval_samples, seed=cfg.seed, columns=t.columns, dataset=t.dataset)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies ``tokenizer``'s output: its name and class and a SHA-256 of its definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: normaliser, pre-tokeniser, vocabulary, post-processor
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {key: getattr(tokenizer, key, None) for key in (
        "pad_token_id", "bos_token_id", "eos_token_id", "padding_side", "chat_template")}
    digest = hashlib.sha256((definition + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "class": type(tokenizer).__name__,
            "hash": digest}


def _source(cfg: RunConfig, spec: TaskSpec) -> dict[str, Any]:
    if cfg.task.data_dir is None:
        return {"hub": list(spec.hub_path)}
    folder = Path(cfg.task.data_dir).expanduser().resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return {"dir": str(folder), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(cfg: RunConfig, spec: TaskSpec, tokenizer: Any) -> str:
    """The SHA-256 (hex) of everything the token rows depend on (see the module docstring)."""
    t = cfg.task
    limited = t.max_train_samples is not None or t.max_eval_samples is not None
    parts = {
        "version": CACHE_VERSION, "task": spec.name, "eval_splits": list(spec.eval_splits),
        "max_length": t.max_length, "prompt_format": t.prompt_format, "columns": dict(sorted(t.columns.items())),
        "tokenizer": tokenizer_fingerprint(tokenizer), "source": _source(cfg, spec),
        "max_train_samples": t.max_train_samples, "max_eval_samples": t.max_eval_samples,
        "seed": cfg.seed if limited else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | Path, cfg: RunConfig, spec: TaskSpec, tokenizer: Any) -> Path:
    """The file the token rows of ``cfg``'s data under ``tokenizer`` are cached in."""
    return Path(cache_dir) / f"tokens-{spec.name}-{cache_key(cfg, spec, tokenizer)[:20]}.json"


def encoded_splits(cfg: RunConfig, spec: TaskSpec, tokenizer: Any, cache_dir: str | Path | None = None,
                   rows: dict[str, list[Row]] | None = None) -> dict[str, Encoded]:
    """Token rows of ``train`` and of each of ``spec.eval_splits``; read from ``cache_dir`` when
    cached there, else tokenised (from ``rows``, or the config's data loaded now) and, with a
    ``cache_dir``, written there."""
    path = cache_path(cache_dir, cfg, spec, tokenizer) if cache_dir is not None else None
    if path is not None and path.is_file():
        return {split: _decode(data) for split, data in json.loads(path.read_text()).items()}
    rows = rows if rows is not None else load_rows(cfg, spec)
    t = cfg.task
    encoded = {split: encode_rows(rows[split], spec, tokenizer, max_length=t.max_length,
                                  prompt_format=t.prompt_format, score_labels=split != "train")
               for split in ("train", *spec.eval_splits)}
    if path is not None:
        _write_atomic(path, json.dumps({split: _encode(e) for split, e in encoded.items()}))
    return encoded


def _encode(data: Encoded) -> dict[str, Any]:
    return {"encodings": data.encodings, "labels": data.labels, "extras": data.extras,
            "causal": asdict(data.causal) if data.causal is not None else None}


def _decode(blob: dict[str, Any]) -> Encoded:
    causal = blob["causal"]
    if causal is not None:  # JSON object keys are strings; gold maps example positions (ints)
        causal = CausalEncoding(**{**causal, "gold": {int(k): v for k, v in causal["gold"].items()}})
    return Encoded(blob["encodings"], blob["labels"], blob["extras"], causal)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
