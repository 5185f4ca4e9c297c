"""Save an adapted model's adapter to a folder and read it back onto its base model: the dora_lab
adapter format, in the core because a training run writes it (no run -> export arrow).

A saved adapter is two files:

    adapter.safetensors    every adapter layer's A, B, c, mask and index, plus every trainable
                           parameter outside the adapters (the task head: classifier, pooler ...),
                           under the names they have in the adapted model's state_dict
    adapter_config.json    format version, r0 / alpha / dropout, per-layer stored and active ranks
                           and hard_mask flags, the target module names, the base model identity
                           (name or path, model_type, num_labels, a fingerprint of frozen base
                           weights, :mod:`dora_lab.core.fingerprint`), the dora_lab version, a checksum
                           of the weights file, and ``extra`` (run config, metrics)

No pickle anywhere.  :func:`read_adapter` reads and checks both files; :func:`apply_adapter` injects
adapters at the saved ``r0`` into the saved targets of a base model you loaded, compacts each layer
to its saved components (``index``), loads the weights and checks everything it can; what does not
fit is named in an :class:`AdapterError`.  Loading the base model itself by its saved name (the Hub,
a local folder) is :func:`dora_lab.export.checkpoint.load_adapter`'s, above the core::

    save_adapter(model, "runs/x/adapter", base_model="sentence-transformers/all-MiniLM-L6-v2", num_labels=2)
    config, tensors = read_adapter("runs/x/adapter")
    model = apply_adapter(my_base, config, tensors)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .adapter import (
    LINEAR_TYPES,
    RankOneLinear,
    adapter_layers,
    count_parameters,
    inject_adapters,
    linear_features,
)
from .fingerprint import base_fingerprint, fingerprint_mismatch
from .version import __version__

__all__ = [
    "ADAPTER_DIRNAME", "CONFIG_NAME", "FORMAT_VERSION", "MLFLOW_ADAPTER_TAG", "WEIGHTS_NAME",
    "AdapterError", "AdapterFileError", "AdapterMismatchError", "AdapterSaveError", "BaseModelError",
    "apply_adapter", "read_adapter", "read_adapter_config", "save_adapter",
]

FORMAT = "dora_lab.adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_DIRNAME = "adapter"  # a training run saves its best adapter to <run_dir>/adapter/
MLFLOW_ADAPTER_TAG = "dora_lab.adapter_dir"  # MLflow run tag: absolute path of that folder
_LAYER_TENSORS = ("A", "B", "c", "mask", "index")


class AdapterError(ValueError):
    """Base class: an adapter could not be saved or loaded."""


class AdapterSaveError(OSError):
    """The adapter's files could not be written (full disk, file-size limit); nothing of it is left."""


class AdapterFileError(AdapterError):
    """The adapter folder is missing, not a dora_lab adapter, damaged, truncated or inconsistent."""


class AdapterMismatchError(AdapterError):
    """The model does not fit the adapter: another base model, missing layers, other shapes."""


class BaseModelError(AdapterError):
    """The base model named in the adapter could not be loaded."""


# -- save ---------------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    base_model: str,
    num_labels: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s adapter and trainable head to ``folder``; returns the folder.

    ``base_model`` is what :func:`load_adapter` passes to ``from_pretrained`` (a Hub id or a
    local path); ``extra`` is stored as JSON (values that are not JSON become strings).
    """
    layers = adapter_layers(model)
    if not layers:
        raise AdapterError("model has no adapter layers (RankOneLinear): call inject_adapters first")
    adapter_ids = {id(p) for layer in layers.values() for p in (layer.A, layer.B, layer.c)}
    head = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids]
    state = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    for name in layers:
        for t in _LAYER_TENSORS:
            tensors[f"{name}.{t}"] = state[f"{name}.{t}"]
    for name in head:
        tensors[name] = state[name]
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = st_save(tensors, metadata={"format": "pt", "dora_lab_format": str(FORMAT_VERSION)})

    first = next(iter(layers.values()))
    counts = count_parameters(model)
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dora_lab_version": __version__,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "r0": first.r0,
        "alpha": first.alpha,
        "dropout": _dropout_p(first),
        "targets": list(layers),
        "layers": {
            name: {
                "r0": layer.r0,
                "alpha": layer.alpha,
                "dropout": _dropout_p(layer),
                "rank": layer.rank,
                "active_rank": layer.active_rank,
                "hard_mask": bool(layer.hard_mask),
                "in_features": layer.in_features,
                "out_features": layer.out_features,
            }
            for name, layer in layers.items()
        },
        "head": head,
        "base_model": {
            "name_or_path": str(base_model),
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "model_class": type(model).__name__,
            "num_labels": int(num_labels),
            "fingerprint": base_fingerprint(model, skip_modules=list(layers), skip_params=head),
        },
        "parameters": {
            "adapter_stored": counts.adapter_stored,
            "adapter_active": counts.adapter_active,
            "head": counts.head,
            "average_rank": counts.average_rank,
        },
        "extra": json.loads(json.dumps(dict(extra or {}), default=str)),
    }
    return _write_adapter(Path(folder), blob, config)


def _write_adapter(out: Path, blob: bytes, config: Mapping[str, Any]) -> Path:
    """Write the weights ``blob`` and ``config`` into ``out``, each file atomically; on a failure (a full
    disk, a file-size limit) a folder this call made is removed, so no half adapter is left to be
    mistaken for one, and :class:`AdapterSaveError` says the adapter was not saved."""
    new = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / WEIGHTS_NAME, blob)
        _atomic_write(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    except OSError as exc:
        if new:
            shutil.rmtree(out, ignore_errors=True)
        raise AdapterSaveError(f"the adapter was NOT saved to {out}: {exc.strerror or exc}"
                               f"{f' ({exc.filename})' if exc.filename else ''}; free space (or raise the "
                               "file-size limit) and train again") from exc
    return out


# -- load ---------------------------------------------------------------------------------------
def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a dora_lab adapter folder (checked, not the weights)."""
    path = Path(folder)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        hint = ""
        if (path / ADAPTER_DIRNAME / CONFIG_NAME).is_file():
            hint = f"; the adapter of this run is in {path / ADAPTER_DIRNAME}"
        elif not path.exists():
            hint = "; the folder does not exist"
        raise AdapterFileError(f"no {CONFIG_NAME} in {path}: not an adapter saved by save_adapter{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path} is damaged (not valid JSON: {e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        if isinstance(config, dict) and "peft_type" in config:
            raise AdapterFileError(
                f"{path} holds a PEFT adapter (peft_type {config['peft_type']}), not a dora_lab adapter; "
                f"load it with peft.PeftModel.from_pretrained(base_model, {str(path)!r})"
            )
        raise AdapterFileError(f"{cfg_path} is not a dora_lab adapter config (no 'format': {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{cfg_path} has format_version {version!r}; this dora_lab ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade dora_lab"
        )
    for key in ("layers", "head", "base_model", "weights_file"):
        if key not in config:
            raise AdapterFileError(f"{cfg_path} is incomplete: no {key!r}")
    return config


def read_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked ``adapter_config.json`` and weights of the adapter in ``folder``: a damaged,
    truncated or inconsistent file is refused here, before any base model is loaded or touched."""
    path = Path(folder)
    config = read_adapter_config(path)
    tensors = _read_weights(path / str(config["weights_file"]), config.get("weights_sha256"))
    expected = {f"{n}.{t}" for n in config["layers"] for t in _LAYER_TENSORS} | set(config["head"])
    if set(tensors) != expected:
        missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterFileError(
            f"{path / str(config['weights_file'])} does not match {CONFIG_NAME}: "
            f"missing tensors {missing[:6]}, unexpected tensors {unknown[:6]}"
        )
    return config, tensors


def apply_adapter(
    model: nn.Module,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    check_base: bool = True,
) -> nn.Module:
    """Put the adapter read by :func:`read_adapter` onto ``model`` (a plain base model, changed in
    place); returns it.  Adapter and head parameters come back trainable, the rest frozen; the
    model's train/eval mode is not changed.  ``check_base=False`` skips the fingerprint check (only
    for a base you know is right)."""
    layer_cfgs: dict[str, dict[str, Any]] = config["layers"]
    head: list[str] = list(config["head"])
    base_info: dict[str, Any] = config["base_model"]
    _check_structure(model, base_info, layer_cfgs, head, tensors)  # everything is checked before
    if check_base and (problem := fingerprint_mismatch(model, base_info, layer_cfgs, head)):
        raise AdapterMismatchError(problem)  # the model is changed below, so a refused one is left as it was

    groups: dict[tuple[int, float, float], list[str]] = {}
    for name, lc in layer_cfgs.items():
        groups.setdefault((int(lc["r0"]), float(lc["alpha"]), float(lc["dropout"])), []).append(name)
    for (r0, alpha, dropout), names in groups.items():
        regex = "|".join(re.escape(n) for n in names)
        # the adapters in the dtype they were saved in (float32 over a bf16 or 4-bit base, as they trained)
        inject_adapters(model, r0=r0, targets=regex, alpha=alpha, dropout=dropout, trainable=(),
                        dtype=tensors[f"{names[0]}.A"].dtype)
    layers = adapter_layers(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            layer.train(model.training)  # new modules start in train mode: follow the model's mode
            index = tensors[f"{name}.index"].to(torch.long)
            if index.numel() < layer.r0:  # rebuild the compaction: keep exactly the saved components
                layer.mask.zero_()
                layer.mask[index] = 1
                layer.compact()
            for t in ("A", "B", "c", "mask", "index"):
                getattr(layer, t).copy_(tensors[f"{name}.{t}"])
            layer.hard_mask = bool(layer_cfgs[name]["hard_mask"])
            for p in (layer.A, layer.B, layer.c):
                p.requires_grad_(True)
        for name in head:
            params[name].copy_(tensors[name])
            params[name].requires_grad_(True)
    return model


def _check_structure(
    model: nn.Module,
    base_info: Mapping[str, Any],
    layer_cfgs: Mapping[str, Mapping[str, Any]],
    head: list[str],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Refuse a model the adapter does not fit, and a file whose tensors disagree with its JSON."""
    if adapter_layers(model):
        raise AdapterMismatchError("model already has adapter layers: pass the plain base model")
    saved_type = base_info.get("model_type")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    saved_for = f"the adapter was saved for {base_info['name_or_path']!r} ({saved_type})"
    if saved_type and model_type and saved_type != model_type:
        raise AdapterMismatchError(f"wrong base model: {saved_for}, this model is a {model_type!r} model")
    modules = dict(model.named_modules())
    missing = [n for n in layer_cfgs if not isinstance(modules.get(n), LINEAR_TYPES)]
    if missing:
        raise AdapterMismatchError(
            f"the base model has no nn.Linear or Conv1D named {missing[:4]} ({len(missing)} of {len(layer_cfgs)} "
            f"adapted layers missing): {saved_for}"
        )
    for name, lc in layer_cfgs.items():
        here = linear_features(modules[name])
        d_in, d_out, rank, r0 = int(lc["in_features"]), int(lc["out_features"]), int(lc["rank"]), int(lc["r0"])
        if here != (d_in, d_out):
            raise AdapterMismatchError(
                f"wrong base model: {name} has shape {d_in} -> {d_out} in the adapter, "
                f"{here[0]} -> {here[1]} here; {saved_for}"
            )
        shapes = {"A": (rank, d_in), "B": (d_out, rank), "c": (rank,), "mask": (rank,), "index": (rank,)}
        for t, shape in shapes.items():
            if tuple(tensors[f"{name}.{t}"].shape) != shape:
                raise AdapterFileError(f"{name}.{t} has shape {tuple(tensors[f'{name}.{t}'].shape)} in the "
                                       f"weights file, {shape} by {CONFIG_NAME}")
        index = tensors[f"{name}.index"]
        if rank and (index.min() < 0 or index.max() >= r0 or not bool((index[1:] > index[:-1]).all())):
            raise AdapterFileError(f"{name}.index is not {rank} increasing component indices in [0, {r0})")
    params = dict(model.named_parameters())
    for name in head:
        if name not in params:
            raise AdapterMismatchError(f"the base model has no parameter {name!r} (a saved head parameter)")
        if params[name].shape != tensors[name].shape:
            raise AdapterMismatchError(
                f"shape mismatch for head parameter {name}: file {tuple(tensors[name].shape)}, model "
                f"{tuple(params[name].shape)} (another num_labels?); {saved_for}"
            )


def _read_weights(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterFileError(f"the adapter weights {path} are missing")
    blob = path.read_bytes()
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise AdapterFileError(
            f"{path} is damaged or truncated ({len(blob)} bytes; its checksum differs from the one in "
            f"{CONFIG_NAME}): save the adapter again or copy the file again"
        )
    try:
        return st_load(blob)
    except SafetensorError as e:
        raise AdapterFileError(f"{path} is damaged or truncated (not a readable safetensors file: {e})") from e


# -- small helpers ------------------------------------------------------------------------------
def _dropout_p(layer: RankOneLinear) -> float:
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: through a temporary file, removed if the write fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
