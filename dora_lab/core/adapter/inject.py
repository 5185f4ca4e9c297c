"""Put rank-1-component adapters into the chosen linear layers of any ``nn.Module``.

Targets are given like PEFT's ``target_modules``: a *list* of names matched against the end of
each module's dotted name (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``), or
a single *string* used as a regular expression that must match the whole dotted name.  With no
targets, the default for the model family (``config.model_type``) is used: all six linears of
every BERT/RoBERTa/DeBERTa layer, the attention and MLP projections of decoder models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .layer import InitMode, RankOneLinear

__all__ = [
    "DEFAULT_TARGETS",
    "ParameterCount",
    "adapter_layers",
    "count_parameters",
    "default_targets",
    "inject_adapters",
]

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
}


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ValueError(
        f"no default adapter targets for model_type {model_type!r}; name them with "
        f"'adapter.targets' (a list of module-name suffixes or one regular expression). "
        f"Known families: {', '.join(sorted(DEFAULT_TARGETS))}"
    )


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
    init: InitMode = "dora",
    trainable: Iterable[str] = ("classifier",),
) -> dict[str, RankOneLinear]:
    """Replace matching ``nn.Linear`` modules in place; freeze everything else but ``trainable``.

    ``trainable`` names modules (suffix or substring of the dotted parameter name, e.g.
    ``"classifier"``, ``"pooler"``) whose own parameters stay trainable: the task head.
    Returns the adapted layers by their dotted module name.
    """
    if targets is None:
        targets = default_targets(model)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, targets)
    ]
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"adapter targets {targets!r} matched no nn.Linear; some linear layers of this model: "
            f"{linears}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, RankOneLinear] = {}
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = RankOneLinear(linear, r0=r0, alpha=alpha, dropout=dropout, init=init)
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
