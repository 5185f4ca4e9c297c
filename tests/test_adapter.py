"""The adapter core: initialisation, the forward formula, parameter counts, targets, merging."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import HIDDEN, INTERMEDIATE, N_LAYERS, adamw, adapted_bert, batches, logits, tiny_bert, train
from torch import nn

from dora_lab import RankOneLinear, adapter_layers, count_parameters, default_targets, inject_adapters

SIX = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
       "intermediate.dense", "output.dense"]
ALL_SIX = [f"bert.encoder.layer.{i}.{s}" for i in range(N_LAYERS) for s in SIX]


# -- step 0: the adapted model is the base model ------------------------------------------------------
@pytest.mark.parametrize("init", ["dora", "adalora"])
def test_step0_logits_equal_the_base_model(init: str) -> None:
    base = tiny_bert(0)
    model = adapted_bert(0, base=base, init=init, dropout=0.1)
    model.eval()
    data = batches(2)
    torch.testing.assert_close(logits(model, data), logits(base, data), rtol=0, atol=1e-12)
    for layer in adapter_layers(model).values():
        assert torch.equal(layer.c, torch.zeros_like(layer.c))
        assert layer.A.abs().min() > 0 and layer.B.abs().min() > 0  # only c starts at zero


def test_dora_and_adalora_initialisations() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(400, 300)
    dora = RankOneLinear(lin, r0=50, init="dora")
    # The official DoRA code's kaiming_uniform_(w) (a = 0) on a (fan_out, fan_in) tensor:
    # U(-sqrt(6 / fan_in), sqrt(6 / fan_in)); nn.Linear's a = sqrt(5) would give 1/sqrt(fan_in),
    # sqrt(6) times narrower, which the lower bound on the largest entry rules out.
    for p, fan_in in ((dora.A, 400), (dora.B, 50)):
        bound = math.sqrt(6 / fan_in)
        assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound
        assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    ada = RankOneLinear(lin, r0=50, init="adalora")
    for p in (ada.A, ada.B):
        assert p.mean().abs() < 0.002 and p.std().item() == pytest.approx(0.02, rel=0.05)
    assert ada.scale == dora.scale == 8.0 / 50
    assert not lin.weight.requires_grad and not lin.bias.requires_grad


def test_bad_layer_arguments_raise() -> None:
    with pytest.raises(ValueError, match="r0 must be >= 1, got 0"):
        RankOneLinear(nn.Linear(3, 3), r0=0)
    with pytest.raises(ValueError, match="init must be 'dora' or 'adalora', got 'svd'"):
        RankOneLinear(nn.Linear(3, 3), r0=2, init="svd")  # type: ignore[arg-type]


# -- the forward formula ------------------------------------------------------------------------------
def test_forward_is_base_plus_scaled_rank_one_sum_by_hand() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = RankOneLinear(base, r0=3, alpha=6.0, dropout=0.5).eval()
    with torch.no_grad():
        layer.c.copy_(torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64))
    x = torch.randn(4, 6, dtype=torch.float64)
    w0, b0, a, b, c = base.weight, base.bias, layer.A, layer.B, layer.c

    def by_hand(mask: list[float]) -> torch.Tensor:
        rows = []
        for n in range(4):
            h = [sum(w0[o, j] * x[n, j] for j in range(6)) + b0[o] for o in range(5)]
            for i in range(3):
                proj = sum(a[i, j] * x[n, j] for j in range(6))
                for o in range(5):
                    h[o] = h[o] + (6.0 / 3) * c[i] * mask[i] * b[o, i] * proj
            rows.append(torch.stack(h))
        return torch.stack(rows).detach()

    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand([1, 1, 1]), rtol=1e-12, atol=1e-12)
        dw = sum((6.0 / 3) * c[i] * torch.outer(b[:, i], a[i]) for i in range(3))
        torch.testing.assert_close(layer.delta_weight(), dw)
        layer.freeze_mask(torch.tensor([True, False, True]))  # c_1 zeroed and masked from now on
        with torch.no_grad():
            layer.c[1] = 7.0  # a masked component does not count even with c != 0
        torch.testing.assert_close(layer(x), by_hand([1, 0, 1]), rtol=1e-12, atol=1e-12)
        layer.train()  # dropout on the adapter path only: the base path is untouched
        torch.manual_seed(1)
        out = layer(x)
        assert not torch.allclose(out, by_hand([1, 0, 1]))


def test_training_dropout_is_inverted_dropout_on_the_adapter_input_only() -> None:
    """With A = B = I, c = 1 and alpha = r0 the adapter's output is ``dropout(x)`` itself: every
    entry of ``x = 1`` must come out as 0 or ``1/(1-p)``, kept with probability ``1-p``."""
    n, p = 20, 0.1
    base = nn.Linear(n, n).double()
    layer = RankOneLinear(base, r0=n, alpha=float(n), dropout=p).train()
    with torch.no_grad():
        layer.A.copy_(torch.eye(n))
        layer.B.copy_(torch.eye(n))
        layer.c.fill_(1.0)
    x = torch.ones(1000, n, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(0)
        first = layer(x) - base(x)
        torch.manual_seed(0)
        again = layer(x) - base(x)
        other = layer(x) - base(x)
    kept = first > 0
    torch.testing.assert_close(first[kept], torch.full_like(first[kept], 1 / (1 - p)))
    assert torch.equal(first[~kept], torch.zeros_like(first[~kept]))
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01  # 20,000 draws: 5 standard deviations
    assert torch.equal(first, again) and not torch.equal(first, other)  # torch.manual_seed fixes the mask
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x) - base(x), x)


def test_soft_pruned_component_is_zero_but_still_learns() -> None:
    torch.manual_seed(0)
    layer = RankOneLinear(nn.Linear(4, 3).double(), r0=2, dropout=0.0)
    with torch.no_grad():
        layer.c.fill_(1.0)
    layer.soft_prune(torch.tensor([True, False]))
    assert layer.c.tolist() == [1.0, 0.0] and layer.mask.tolist() == [1.0, 0.0] and not layer.hard_mask
    layer(torch.randn(5, 4, dtype=torch.float64)).pow(2).sum().backward()
    assert layer.c.grad is not None and layer.c.grad[1] != 0  # it can come back


# -- parameter counts ---------------------------------------------------------------------------------
PER_COMPONENT = {"attention.self.query": 65, "attention.self.key": 65, "attention.self.value": 65,
                 "attention.output.dense": 65, "intermediate.dense": HIDDEN + INTERMEDIATE + 1,
                 "output.dense": INTERMEDIATE + HIDDEN + 1}
HEAD = HIDDEN * 2 + 2  # the classifier


def test_parameter_counts_by_hand() -> None:
    base_total = sum(p.numel() for p in tiny_bert(0).parameters())
    model = adapted_bert(0, r0=4)
    adapter = N_LAYERS * 4 * sum(PER_COMPONENT.values())
    assert adapter == 2 * 4 * (4 * 65 + 2 * 97) == 3632
    count = count_parameters(model)
    assert (count.adapter_stored, count.adapter_active, count.head) == (adapter, adapter, HEAD)
    assert count.trainable == adapter + HEAD == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count.total == base_total + adapter
    assert (count.active_components, count.layers, count.average_rank) == (48, 12, 4.0)

    # Prune: layer 0's query keeps 1 of 4, layer 1's intermediate keeps 2 of 4.
    layers = adapter_layers(model)
    layers["bert.encoder.layer.0.attention.self.query"].soft_prune(torch.tensor([False, True, False, False]))
    layers["bert.encoder.layer.1.intermediate.dense"].soft_prune(torch.tensor([True, False, True, False]))
    active = adapter - 3 * 65 - 2 * 97
    count = count_parameters(model)
    assert (count.adapter_active, count.adapter_stored, count.active_components) == (active, adapter, 43)
    for layer in layers.values():
        layer.compact()
    count = count_parameters(model)
    assert (count.adapter_active, count.adapter_stored, count.trainable) == (active, active, active + HEAD)
    assert count.total == base_total + active


# -- targets ------------------------------------------------------------------------------------------
def test_default_bert_targets_are_the_six_linears_per_layer() -> None:
    model = tiny_bert(0)
    assert default_targets(model) == ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                      "output.dense"]
    layers = inject_adapters(model, r0=2)
    assert list(layers) == ALL_SIX
    assert isinstance(model.get_submodule("bert.pooler.dense"), nn.Linear) and isinstance(model.classifier, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{p}" for n in ALL_SIX for p in ("A", "B", "c")} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected  # base weights, embeddings, pooler frozen


def test_list_of_suffixes_and_regex_targets() -> None:
    layers = inject_adapters(tiny_bert(0), r0=2, targets=["query", "value"])
    assert list(layers) == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    layers = inject_adapters(tiny_bert(0), r0=2, targets=r"bert\.encoder\.layer\.1\..*dense")
    assert list(layers) == [f"bert.encoder.layer.1.{s}" for s in ("attention.output.dense", "intermediate.dense",
                                                                  "output.dense")]
    # A suffix matches whole dotted parts only: "dense" picks the pooler too, "ense" picks nothing.
    assert "bert.pooler.dense" in inject_adapters(tiny_bert(0), r0=1, targets=["dense"])
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_adapters(tiny_bert(0), r0=1, targets=["ense"])


def test_unmatched_targets_raise_with_the_model_linears() -> None:
    with pytest.raises(ValueError, match=r"adapter targets \['q_proj'\] matched no nn.Linear or Conv1D; .*"
                                         r"query x2 \(e.g. bert.encoder.layer.0.attention.self.query\)"):
        inject_adapters(tiny_bert(0), r0=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="matched no nn.Linear"):  # a regex must match the whole name
        inject_adapters(tiny_bert(0), r0=2, targets="query")
    bare = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"no default adapter targets for model_type None \(known families: .*bert.*\); "
                                         r"name them with 'adapter.targets'.* linear layers: 0 x1 \(e.g. 0\)"):
        inject_adapters(bare, r0=2)
    layers = inject_adapters(bare, r0=2, targets=["0"])
    assert list(layers) == ["0"]


# -- merging ------------------------------------------------------------------------------------------
def test_merge_and_unmerge_keep_the_logits() -> None:
    model = adapted_bert(0)
    train(model, adamw(model), None, batches(3))
    data = batches(2, seed=9)
    before = logits(model, data)
    layers = adapter_layers(model)
    w0 = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    dws = {n: layer.delta_weight().detach().clone() for n, layer in layers.items()}
    assert max(float(dw.abs().max()) for dw in dws.values()) > 1e-3  # the adapters do something
    for layer in layers.values():
        layer.merge()
        layer.merge()  # idempotent
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base.weight, w0[n] + dws[n])
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.compact()
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=1e-5)
    for layer in layers.values():
        layer.unmerge()
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=1e-5)
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base.weight, w0[n], rtol=0, atol=1e-12)


def test_active_rank_follows_every_change_of_the_mask() -> None:
    """active_rank is cached (a GPU count is a host-device sync) but must see every mask change:
    pruning, in-place writes, load_state_dict, copies and compaction."""
    layer = RankOneLinear(nn.Linear(4, 5), r0=3)
    seen = [layer.active_rank]
    layer.soft_prune(torch.tensor([True, False, True]))
    seen.append(layer.active_rank)
    layer.mask.fill_(1)
    seen.append(layer.active_rank)
    layer.freeze_mask(torch.tensor([True, False, False]))
    seen.append(layer.active_rank)
    twin = copy.deepcopy(layer)
    twin.mask.fill_(1)
    seen += [twin.active_rank, layer.active_rank]
    layer.compact()
    seen += [layer.active_rank, layer.rank]
    fresh = RankOneLinear(nn.Linear(4, 5), r0=3)
    seen.append(fresh.active_rank)
    fresh.load_state_dict({k: v * 0 if k == "mask" else v for k, v in twin.state_dict().items()})
    seen.append(fresh.active_rank)
    assert seen == [3, 2, 3, 1, 3, 1, 1, 1, 3, 0]
    assert "_active_cache" not in fresh.state_dict() and "_active_cache" not in dict(fresh.named_buffers())
