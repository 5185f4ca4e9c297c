"""Shared test helpers: a tiny BERT built from a config, random batches, one training loop, and
the collection-time matrix over every registered scorer, schedule and allocation method.

Any test that takes a ``scorer_name``, ``schedule_name`` or ``method_name`` argument runs once per registered
name, read from the registries when pytest collects the test.  So a scorer or schedule
registered by a plugin (``tests/plugins/*.py`` is imported below through
:func:`dora_lab.import_plugins`, exactly as a config's ``plugins`` key would) or by any module
imported before collection joins the matrix without editing it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import dora_lab
from dora_lab import PruningController, RankOneLinear, StepInfo, adapter_layers, inject_adapters

PLUGINS = sorted(str(p) for p in (Path(__file__).parent / "plugins").glob("*.py"))
dora_lab.import_plugins(PLUGINS)
torch.set_num_threads(1)  # tiny models: one thread is fastest, and the CI machine's cores are shared

VOCAB = 100
HIDDEN = 32
INTERMEDIATE = 64
N_LAYERS = 2

Batch = tuple[torch.Tensor, torch.Tensor]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for arg, names in (("scorer_name", dora_lab.list_scorers), ("schedule_name", dora_lab.list_schedules),
                       ("method_name", dora_lab.list_methods)):
        if arg in metafunc.fixturenames and not _parametrized_by_marker(metafunc, arg):
            metafunc.parametrize(arg, names())


def _parametrized_by_marker(metafunc: pytest.Metafunc, arg: str) -> bool:
    """A test may pin its own values with ``@pytest.mark.parametrize("scorer_name", [...])``."""
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0]
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",")]
        if arg in argnames:
            return True
    return False


def tiny_config() -> BertConfig:
    """2 layers, hidden 32, 2 heads, MLP 64, vocabulary 100, 2 labels; no dropout."""
    return BertConfig(  # type: ignore[call-arg]
        hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=2,
        intermediate_size=INTERMEDIATE, vocab_size=VOCAB, num_labels=2, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float64) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config())
    torch.nn.Module.to(model, dtype=dtype)  # in place
    return model.eval()


def adapted_bert(
    seed: int = 0, r0: int = 4, dtype: torch.dtype = torch.float64, base: torch.nn.Module | None = None,
    **inject_kw: object,
) -> torch.nn.Module:
    """A tiny BERT (or a deep copy of ``base``) with adapters in the default six linears per layer."""
    model = copy.deepcopy(base) if base is not None else tiny_bert(seed, dtype)
    torch.manual_seed(seed + 1)
    inject_kw.setdefault("dropout", 0.0)
    inject_adapters(model, r0=r0, **inject_kw)  # type: ignore[arg-type]
    return model


def tiny_decoder(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A 2-layer, 32-wide causal LM with vocabulary 100, no dropout, in eval mode: ``llama`` (4 heads,
    2 key/value heads, so k_proj/v_proj are 32 -> 16; MLP 64; the family of SmolLM2) or ``gpt2``
    (``Conv1D`` layers with transposed weights: c_attn 32 -> 96, c_fc 32 -> 64, c_proj 32 -> 32 and
    64 -> 32)."""
    torch.manual_seed(seed)
    model: torch.nn.Module
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=2, n_inner=INTERMEDIATE, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(kind)
    torch.nn.Module.to(model, dtype=dtype)
    return model.eval()


DECODERS = ("llama", "gpt2")


def adapted_decoder(kind: str, seed: int = 0, r0: int = 4, dtype: torch.dtype = torch.float64,
                    **inject_kw: object) -> torch.nn.Module:
    """:func:`tiny_decoder` with adapters in the family's default targets (no dropout)."""
    model = tiny_decoder(kind, seed, dtype)
    torch.manual_seed(seed + 1)
    inject_kw.setdefault("dropout", 0.0)
    inject_adapters(model, r0=r0, **inject_kw)  # type: ignore[arg-type]
    return model


def lm_batches(n: int, seed: int = 0, batch: int = 4, seq: int = 8) -> list[Batch]:
    """Causal-LM batches for :func:`train`: ``(input_ids, labels=input_ids)`` (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append((x, x))
    return out


def batches(n: int, seed: int = 0, batch: int = 4, seq: int = 8) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (batch, seq), generator=g), torch.randint(0, 2, (batch,), generator=g))
        for _ in range(n)
    ]


def logits(model: torch.nn.Module, data: Sequence[Batch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=x).logits for x, _ in data])


def adamw(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)


def randomize_c(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every ``c`` non-zero values so the adapter's update is not zero from the start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.c.copy_(torch.randn(layer.c.shape, generator=g, dtype=torch.float64))


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: PruningController | None,
    data: Sequence[Batch],
    before_step: Callable[[int], None] | None = None,
) -> list[StepInfo]:
    """The documented loop: loss (+ regulariser) -> backward -> optimizer.step -> controller.step
    -> zero_grad.  ``before_step(i)`` runs after ``optimizer.step()`` with the gradients present."""
    infos = []
    for i, (x, y) in enumerate(data):
        loss = model(input_ids=x, labels=y).loss
        if controller is not None:
            loss = loss + controller.regularization_loss()
        loss.backward()
        optimizer.step()
        if before_step is not None:
            before_step(i)
        if controller is not None:
            infos.append(controller.step(optimizer))
        optimizer.zero_grad()
    return infos


def slow_magnitude(layer: RankOneLinear) -> torch.Tensor:
    """Materialise every ``dW_i = c_i B[:,i] A[i,:]`` and the full ``B diag(c) A`` (d_out x d_in)."""
    a, b, c = layer.A.detach().double(), layer.B.detach().double(), layer.c.detach().double()
    full = b @ torch.diag(c) @ a
    assert full.shape == (layer.out_features, layer.in_features)
    denominator = torch.sqrt((full**2).sum()) + 1e-8
    shares = []
    for i in range(layer.rank):
        dw_i = c[i] * torch.outer(b[:, i], a[i, :])
        shares.append(torch.sqrt((dw_i**2).sum()) / denominator)
    return torch.stack(shares)
