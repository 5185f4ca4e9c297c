"""Put rank-1-component adapters into the chosen linear layers of any ``nn.Module``.

Targets are given like PEFT's ``target_modules``: a *list* of names matched against the end of
each module's dotted name (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``), or
a single *string* used as a regular expression that must match the whole dotted name, or
``"all-linear"``: every ``nn.Linear``/``Conv1D`` but the output head, as PEFT's ``all-linear`` (the
model's output embeddings, e.g. ``lm_head``, a ``classifier``/``score`` head, and the modules named in
``trainable``, which train in full).  With no targets, the default for the model family
(``config.model_type``) is used: all six linears of every BERT/RoBERTa/DeBERTa layer, the attention
and MLP projections of Llama-style decoders, GPT-2's ``c_attn c_proj c_fc`` (``Conv1D``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layer import DEFAULT_INIT, LINEAR_TYPES, InitMode, RankOneLinear

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "ParameterCount",
    "adapter_layers",
    "all_linear_targets",
    "count_parameters",
    "default_targets",
    "inject_adapters",
    "linear_module_names",
]

#: ``adapter.targets: all-linear``: every linear layer but the output head (PEFT's shorthand).
ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("classifier", "score")  # PEFT's SEQ_CLS_HEAD_NAMES

_BERT_LIKE = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers' Conv1D (weight d_in x d_out)
}


def linear_module_names(model: nn.Module) -> list[str]:
    """Dotted names of every ``nn.Linear`` and ``Conv1D`` in ``model``, in module order (not the
    base layers inside adapters already injected: no adapter in an adapter)."""
    inside = {n + ".base" for n, m in model.named_modules() if isinstance(m, RankOneLinear)}
    return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n not in inside]


def default_targets(model: nn.Module) -> list[str]:
    """The family's default target suffixes (``DEFAULT_TARGETS[config.model_type]``); a model of
    another family is refused with its linear layers' names, so the user can pick."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ValueError(
        f"no default adapter targets for model_type {model_type!r} (known families: "
        f"{', '.join(sorted(DEFAULT_TARGETS))}); name them with 'adapter.targets': a list of module-name "
        f"suffixes, one regular expression, or {ALL_LINEAR!r}. This model's linear layers: "
        f"{_describe_linears(model)}"
    )


def _describe_linears(model: nn.Module) -> str:
    """Each distinct last name of the model's linear layers with its count and one full name."""
    names = linear_module_names(model)
    if not names:
        return "none (no nn.Linear or Conv1D)"
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rpartition(".")[2], []).append(n)
    return "; ".join(f"{leaf} x{len(full)} (e.g. {full[0]})" for leaf, full in groups.items())


def all_linear_targets(model: nn.Module, trainable: Iterable[str] = ()) -> list[str]:
    """The full names ``adapter.targets: all-linear`` adapts: every ``nn.Linear``/``Conv1D`` except
    the output head, as PEFT's ``all-linear`` decides it (the model's output embeddings, or with none
    a ``classifier``/``score`` attribute), and except modules under ``trainable`` (the task head, such
    as a BERT pooler, trains in full: a module cannot be both)."""
    modules = dict(model.named_modules())
    exclude: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    heads = [out_emb] if isinstance(out_emb, nn.Module) else [getattr(model, h, None) for h in _HEAD_NAMES]
    for head in heads:
        if isinstance(head, nn.Module):
            exclude.update(n for n, m in modules.items() if m is head or _is_in(m, head))
    keep = tuple(trainable)
    return [n for n in linear_module_names(model)
            if n not in exclude and not any(_is_under(n + ".weight", t) for t in keep)]


def _is_in(module: nn.Module, head: nn.Module) -> bool:
    return any(module is m for m in head.modules())


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_adapters(
    model: nn.Module,
    r0: int,
    targets: str | Sequence[str] | None = None,
    alpha: float = 8.0,
    dropout: float = 0.1,
    init: InitMode = DEFAULT_INIT,
    trainable: Iterable[str] = ("classifier",),
    dtype: torch.dtype | None = None,
) -> dict[str, RankOneLinear]:
    """Replace matching ``nn.Linear``/``Conv1D`` modules in place; freeze everything else but ``trainable``.

    ``trainable`` names modules (suffix or substring of the dotted parameter name, e.g.
    ``"classifier"``, ``"pooler"``) whose own parameters stay trainable: the task head.
    ``dtype``: of the adapters' ``A``, ``B``, ``c`` (default: each base weight's; float32 on a
    bfloat16 model keeps full-precision trained weights).  Returns the adapted layers by their
    dotted module name.
    """
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = all_linear_targets(model, trainable)
        chosen_names = set(targets)
        chosen = [(n, m) for n, m in model.named_modules() if n in chosen_names]
    else:
        chosen = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, LINEAR_TYPES) and _matches(name, targets)
        ]
    if not chosen:
        raise ValueError(
            f"adapter targets {targets!r} matched no nn.Linear or Conv1D; this model's linear layers: "
            f"{_describe_linears(model)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, RankOneLinear] = {}
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = RankOneLinear(linear, r0=r0, alpha=alpha, dropout=dropout, init=init, dtype=dtype)
        layer.train(linear.training)  # an eval-mode model gets eval-mode adapters (no dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    keep = tuple(trainable)
    for pname, p in model.named_parameters():
        if any(_is_under(pname, t) for t in keep):
            p.requires_grad_(True)
    return layers


def _is_under(param_name: str, module_name: str) -> bool:
    return ("." + param_name).find("." + module_name + ".") >= 0


def adapter_layers(model: nn.Module) -> dict[str, RankOneLinear]:
    """Every adapter layer of ``model`` by dotted module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RankOneLinear)}


@dataclass(frozen=True)
class ParameterCount:
    """Exact parameter counts of an adapted model."""

    total: int
    trainable: int
    adapter_stored: int  # numel of every A, B, c now held
    adapter_active: int  # sum over active components of (d_in + d_out + 1)
    head: int  # trainable parameters outside the adapters
    active_components: int
    layers: int

    @property
    def average_rank(self) -> float:
        return self.active_components / self.layers if self.layers else 0.0


def count_parameters(model: nn.Module) -> ParameterCount:
    layers = adapter_layers(model)
    adapter_ids = {id(p) for layer in layers.values() for p in (layer.A, layer.B, layer.c)}
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(p.numel() for layer in layers.values() for p in (layer.A, layer.B, layer.c))
    head = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids)
    return ParameterCount(
        total=total,
        trainable=trainable,
        adapter_stored=stored,
        adapter_active=sum(layer.active_parameters() for layer in layers.values()),
        head=head,
        active_components=sum(layer.active_rank for layer in layers.values()),
        layers=len(layers),
    )
