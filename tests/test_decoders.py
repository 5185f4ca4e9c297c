"""Decoder LLMs in the adapter core: GPT-2's transposed ``Conv1D``, the family defaults, ``all-linear``
(checked against PEFT's own selection), the refusal of an unknown family, the scorer x schedule
matrix on a tiny Llama and a tiny GPT-2, and save/load, merge and PEFT export (``CAUSAL_LM``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DECODERS, adamw, adapted_decoder, lm_batches, randomize_c, tiny_bert, tiny_decoder, train
from transformers import AutoModelForCausalLM, GPTNeoConfig, GPTNeoForCausalLM
from transformers.pytorch_utils import Conv1D

from dora_lab import (
    PruningController,
    RankOneLinear,
    adapter_layers,
    count_parameters,
    get_schedule,
    inject_adapters,
    make_scorer,
)
from dora_lab.core.checkpoint import save_adapter
from dora_lab.export.checkpoint import load_adapter
from dora_lab.export.merge import merged_model
from dora_lab.export.peft import export_peft
from dora_lab.run.train import main as train_main
from tests.tiny import COLA, minilm_dir, tiny_overrides


def keep(r: int, *idx: int) -> torch.Tensor:
    t = torch.zeros(r, dtype=torch.bool)
    t[list(idx)] = True
    return t


def lm_logits(model: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- GPT-2's Conv1D ------------------------------------------------------------------------------------
def test_conv1d_adapter_equals_a_dense_computation_and_merges_transposed() -> None:
    """Conv1D computes ``x W + b`` with ``W`` stored ``d_in x d_out``; the adapter adds
    ``(alpha/r0) sum_i c_i (x . A_i) B_i``, written here component by component."""
    torch.manual_seed(0)
    conv = Conv1D(96, 32).double()  # GPT-2's c_attn at width 32: 32 -> 96
    with torch.no_grad():
        conv.bias.normal_()
    w0 = conv.weight.detach().clone()
    assert w0.shape == (32, 96)
    layer = RankOneLinear(conv, r0=3, alpha=6.0, dropout=0.0)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (32, 96, True)
    assert layer.A.shape == (3, 32) and layer.B.shape == (96, 3)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w0 + conv.bias)  # c = 0: the base's own output
    with torch.no_grad():
        layer.c.copy_(torch.tensor([0.5, -1.5, 2.0]))

    expected = x @ w0 + conv.bias
    for i in range(3):
        expected = expected + 2.0 * layer.c[i] * (x @ layer.A[i]).unsqueeze(-1) * layer.B[:, i]
    out = layer(x)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    dense = sum(2.0 * layer.c[i] * torch.outer(layer.B[:, i], layer.A[i]) for i in range(3))
    torch.testing.assert_close(layer.delta_weight(), dense, rtol=1e-12, atol=1e-12)  # d_out x d_in

    layer.merge()  # into the stored d_in x d_out weight: transposed
    torch.testing.assert_close(conv.weight, w0 + dense.t())
    torch.testing.assert_close(layer(x), out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv(x), out.detach(), rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(conv.weight, w0, rtol=0, atol=1e-14)

    out.sum().backward()  # gradients reach A, B, c through the Conv1D path
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.A, layer.B, layer.c))
    layer.freeze_mask(keep(3, 0, 2))
    before = layer(x).detach()
    layer.compact()
    assert layer.A.shape == (2, 32) and layer.B.shape == (96, 2) and layer.index.tolist() == [0, 2]
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    assert layer.active_parameters() == 2 * (32 + 96 + 1)


# -- targets -------------------------------------------------------------------------------------------
def test_family_defaults_and_exact_parameter_counts() -> None:
    """Per layer, by hand (r0 = 4; d_in + d_out + 1 per component):
    llama  q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32 -> 519;
    gpt2   c_attn 32+96, attn.c_proj 32+32, c_fc 32+64, mlp.c_proj 64+32 -> 388."""
    llama = adapted_decoder("llama", r0=4)
    names = list(adapter_layers(llama))
    assert len(names) == 14 and names[:7] == [
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert count_parameters(llama).adapter_active == 2 * 4 * 519
    gpt2 = adapted_decoder("gpt2", r0=4)
    names = list(adapter_layers(gpt2))
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"] and len(names) == 8
    assert all(layer.fan_in_fan_out for layer in adapter_layers(gpt2).values())
    counts = count_parameters(gpt2)
    assert counts.adapter_active == counts.adapter_stored == 2 * 4 * 388
    assert counts.trainable == counts.adapter_stored  # nothing else trains: lm_head is frozen


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_all_linear_is_what_peft_selects(kind: str) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_bert(0) if kind == "bert" else tiny_decoder(kind)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    peft_model = peft.get_peft_model(tiny_bert(0) if kind == "bert" else tiny_decoder(kind),
                                     peft.LoraConfig(task_type=task, target_modules="all-linear", r=2))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = inject_adapters(base, r0=2, targets="all-linear", trainable=("classifier",))
    assert set(ours) == peft_targets and len(ours) == {"llama": 14, "gpt2": 8, "bert": 13}[kind]
    assert not any("lm_head" in n or "classifier" in n for n in ours)


def test_all_linear_leaves_modules_that_train_in_full_to_the_head() -> None:
    layers = inject_adapters(tiny_bert(0), r0=2, targets="all-linear", trainable=("classifier", "pooler"))
    assert len(layers) == 12 and "bert.pooler.dense" not in layers


def test_unknown_family_is_refused_with_its_linear_layer_names() -> None:
    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                           attention_types=[[["global"], 2]], max_position_embeddings=16))
    with pytest.raises(ValueError) as err:
        inject_adapters(model, r0=2)
    msg = str(err.value)
    assert "no default adapter targets for model_type 'gpt_neo'" in msg and "'all-linear'" in msg
    assert "q_proj x2 (e.g. transformer.h.0.attn.attention.q_proj)" in msg
    assert "c_fc x2 (e.g. transformer.h.0.mlp.c_fc)" in msg and "lm_head x1" in msg
    assert not adapter_layers(model)  # refused before anything changed
    assert len(inject_adapters(model, r0=2, targets="all-linear")) == 12  # 4 attention + 2 MLP per layer


# -- the shared matrix on decoders ---------------------------------------------------------------------
T, WARMUP, FINAL, INTERVAL = 12, 2, 3, 2


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_full_run_ends_with_exactly_the_target(kind: str, scorer_name: str, schedule_name: str) -> None:
    model = adapted_decoder(kind, dtype=torch.float32)
    layers = adapter_layers(model)
    start = sum(layer.rank for layer in layers.values())  # 56 (llama) or 32 (gpt2)
    controller = PruningController(model, make_scorer(scorer_name), schedule_name, T, target_rank=1.5,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL)
    model.train()
    infos = train(model, adamw(model), controller, lm_batches(T))
    prunes = getattr(get_schedule(schedule_name), "prunes", True)
    target = int(1.5 * len(layers)) if prunes else start
    assert all(torch.isfinite(torch.tensor(i.active_parameters)) for i in infos)
    assert infos[-1].active_components == target == sum(layer.active_rank for layer in layers.values())
    assert infos[-1].active_parameters == count_parameters(model).adapter_active
    if prunes:
        assert sum(layer.rank for layer in layers.values()) == target  # compacted
    assert torch.isfinite(lm_logits(model.eval())).all()


# -- save/load, merge, PEFT export ---------------------------------------------------------------------
def trained_uneven(kind: str) -> torch.nn.Module:
    """float32, c random, ranks 2 (compacted), 0 (compacted), 3 (hard mask), 1 (soft), 4 ..."""
    model = adapted_decoder(kind, dtype=torch.float32)
    randomize_c(model, 1)
    layers = list(adapter_layers(model).values())
    layers[0].freeze_mask(keep(4, 1, 3))
    layers[0].compact()
    layers[1].freeze_mask(keep(4))
    layers[1].compact()
    layers[2].freeze_mask(keep(4, 0, 2, 3))
    layers[3].soft_prune(keep(4, 2))
    return model.eval()


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_save_load_merge_and_peft_export(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    tiny_decoder(kind, dtype=torch.float32).save_pretrained(tmp_path / "base")
    model = trained_uneven(kind)
    ref = lm_logits(model)
    assert (ref - lm_logits(tiny_decoder(kind, dtype=torch.float32))).abs().max() > 1e-3  # the adapter acts

    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"), num_labels=0)
    loaded = load_adapter(tmp_path / "adapter").eval()  # the base comes back as the saved causal LM class
    assert type(loaded) is type(model)
    assert {n: la.rank for n, la in adapter_layers(loaded).items()} == {
        n: la.rank for n, la in adapter_layers(model).items()}
    torch.testing.assert_close(lm_logits(loaded), ref, rtol=0, atol=1e-6)

    plain = merged_model(model)
    assert not adapter_layers(plain)
    torch.testing.assert_close(lm_logits(plain), ref, rtol=1e-4, atol=1e-5)

    export_peft(model, tmp_path / "peft", base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] == (kind == "gpt2")
    assert len(config["target_modules"]) == len(adapter_layers(model)) - 1  # the rank-0 layer is left out
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(lm_logits(reloaded), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not COLA.is_dir(), reason=f"no shared CoLA at {COLA}")
def test_a_run_on_a_family_without_targets_exits_as_bad_input(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer, GPTNeoForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    GPTNeoForSequenceClassification(GPTNeoConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=2, num_heads=2, num_labels=2,
        attention_types=[[["global"], 2]], max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "neo")
    tokenizer.save_pretrained(tmp_path / "neo")
    args = ["configs/cola.yaml", "--run-dir", str(tmp_path / "run")]
    for kv in [*tiny_overrides(tmp_path / "neo", tmp_path, train=16, evals=16), "model.trainable=[score]"]:
        args += ["--set", kv]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "adapter.targets: no default adapter targets for model_type 'gpt_neo'" in err
    assert "q_proj x2 (e.g. transformer.h.0.attn.attention.q_proj)" in err and "Nothing was started" in err
    assert not (tmp_path / "run").exists()


def test_adapted_gpt2_equals_a_gpt2_with_hand_updated_conv1d_weights() -> None:
    """The whole tiny GPT-2: its adapted logits equal those of a plain copy whose Conv1D weights
    (d_in x d_out) get W0 + (sum_i (alpha/r0) c_i B_i A_i^T)^T written in by hand."""
    model = adapted_decoder("gpt2", r0=3, alpha=6.0)
    randomize_c(model, 4)
    dense = tiny_decoder("gpt2")
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            update = sum(2.0 * layer.c[i] * torch.outer(layer.B[:, i], layer.A[i]) for i in range(3))
            dense.get_submodule(name).weight.add_(update.t())  # type: ignore[operator]
    ref = lm_logits(dense)
    assert (ref - lm_logits(tiny_decoder("gpt2"))).abs().max() > 1e-2
    torch.testing.assert_close(lm_logits(model), ref, rtol=1e-10, atol=1e-10)
