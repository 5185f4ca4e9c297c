"""QLoRA (``model.quantization``) on a tiny Llama on the CPU (bitsandbytes' CPU backend): the base is
4-bit and frozen, only the float32 adapters train and are saved, a few steps lower the loss, and the
merged model (the adapters folded into a dequantised copy) computes the adapted model's logits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional extra: pip install 'dora_lab[qlora]'")

from dora_lab import adapter_layers, inject_adapters  # noqa: E402
from dora_lab.core.checkpoint import save_adapter  # noqa: E402
from dora_lab.export.dequantize import dequantized_linear  # noqa: E402
from dora_lab.export.merge import merge_adapters, merged_model  # noqa: E402
from dora_lab.run import quantization  # noqa: E402
from dora_lab.run.config import load_config  # noqa: E402
from dora_lab.run.config_yaml import ConfigError  # noqa: E402
from dora_lab.run.models import load_model_and_tokenizer  # noqa: E402
from dora_lab.run.quantization import (  # noqa: E402
    QuantizationConfig,
    is_quantized,
    quantized_load_kwargs,
    standard_layout,
)
from dora_lab.run.train import train_run  # noqa: E402
from tests.tiny import REPO, make_tiny_llama_dir  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("qlora") / "llama", hidden=64)


def quantized_adapted(folder: Path, compute_dtype: str = "float32") -> tuple[Any, Any]:
    q = QuantizationConfig(compute_dtype=compute_dtype)  # type: ignore[arg-type]
    model, tokenizer = load_model_and_tokenizer(str(folder), 0, causal=True, **quantized_load_kwargs(q, CPU))
    assert standard_layout(model) == 14  # 2 layers x (q k v o gate up down); the tied head stays float32
    torch.manual_seed(0)
    inject_adapters(model, r0=4, alpha=8.0, dropout=0.0, dtype=torch.float32)
    return model, tokenizer


def batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(["What is 3 plus 4? 3 plus 4 is 7.", "Which is larger, 20 or 30? 30 is larger."],
                    return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def test_the_base_is_4_bit_and_frozen_and_only_float32_adapters_train(llama: Path, tmp_path: Path) -> None:
    model, tokenizer = quantized_adapted(llama)
    layers = adapter_layers(model)
    assert layers and all(type(layer.base).__name__ == "Linear4bit" for layer in layers.values())
    assert all(layer.base.weight.dtype == torch.uint8 and not layer.base.weight.requires_grad
               for layer in layers.values())
    adapter_ids = {id(p) for layer in layers.values() for p in (layer.A, layer.B, layer.c)}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and {id(p) for p in trained} == adapter_ids and all(p.dtype == torch.float32 for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=0.02)
    losses = []
    for _ in range(8):
        loss = model(**batch(tokenizer)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    saved = load_file(save_adapter(model, tmp_path / "adapter", base_model=str(llama), num_labels=0)
                      / "adapter.safetensors")
    assert set(saved) == {f"{n}.{t}" for n in layers for t in ("A", "B", "c", "mask", "index")}
    assert all(t.dtype != torch.uint8 for t in saved.values())


def test_merging_into_the_dequantised_copy_keeps_the_adapted_logits(llama: Path) -> None:
    model, tokenizer = quantized_adapted(llama)
    with torch.no_grad():  # a visible update
        for layer in adapter_layers(model).values():
            layer.c.normal_(0.0, 1.0)
    model.eval()
    ids = batch(tokenizer)["input_ids"]
    with torch.no_grad():
        adapted = model(ids).logits
        merged = merged_model(model)
        assert not is_quantized(merged) and not adapter_layers(merged) and is_quantized(model)
        assert getattr(merged.config, "quantization_config", None) is None
        logits = merged(ids).logits
        full = AutoModelForCausalLM.from_pretrained(llama).eval()  # the unquantised base, not what trained
        layers = adapter_layers(model)
        for name, layer in layers.items():  # the same update merged into the original float32 weights
            full.get_submodule(name).weight.add_(layer.delta_weight())
        original = full(ids).logits
    assert torch.allclose(logits, adapted, atol=1e-4), (logits - adapted).abs().max()
    assert (original - adapted).abs().max() > 100 * (logits - adapted).abs().max()  # 4-bit rounding shows
    with pytest.raises(ValueError, match="use merged_model"):
        merge_adapters(model)


def test_a_layer_repacked_by_the_cpu_kernel_dequantises_to_what_it_computes(llama: Path) -> None:
    q = QuantizationConfig(compute_dtype="float32")
    model, _ = load_model_and_tokenizer(str(llama), 0, causal=True, **quantized_load_kwargs(q, CPU))
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = dequantized_linear(layer)(x)  # standard layout: dequantize_4bit
        standard = layer.train()(x)
        packed = layer.eval()(x)  # repacks on a CPU with bf16 instructions
        again = dequantized_linear(layer)(x)
    assert torch.allclose(exact, standard, atol=1e-5)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) or torch.equal(again, exact)
    assert torch.allclose(again, packed, atol=5e-3) and torch.allclose(again, exact, atol=5e-3)  # bf16 rounding


def test_the_config_and_the_refusal_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    yaml = REPO / "configs" / "smollm2_instruct.yaml"
    cfg = load_config(yaml, ["model.quantization={type: nf4, double_quant: true, compute_dtype: bfloat16}"])
    assert cfg.model.quantization == QuantizationConfig()
    bnb = cfg.model.quantization.bnb_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.quantization.bits"):
        load_config(yaml, ["model.quantization={bits: 8}"])
    with pytest.raises(ConfigError, match="train.method 'full' cannot train it: set train.method to adapter"):
        quantized_load_kwargs(cfg.model.quantization, CPU, "full")
    # bitsandbytes is installed here; its absence is simulated at the one place that looks for it
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'dora_lab\[qlora\]'"):
        quantized_load_kwargs(cfg.model.quantization, CPU)


def test_a_qlora_run_trains_and_lowers_the_perplexity(llama: Path, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", [
        f"model.name={llama}", f"output_dir={tmp_path}", "task.max_train_samples=32", "task.max_eval_samples=16",
        "task.max_length=96", "train.max_steps=6", "train.batch_size=8", "train.eval_every=3",
        "schedule.interval=1", "train.lr=0.02", "model.quantization={compute_dtype: float32}"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert math.isfinite(result.history[-1]["perplexity"])
    assert result.history[-1]["perplexity"] < result.initial_metrics["perplexity"]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert saved and all(t.dtype == torch.float32 or t.dtype == torch.int64 for t in saved.values())


def test_a_saved_qlora_adapter_loads_onto_its_4_bit_base_and_merges_into_the_dequantised_copy(
        llama: Path, tmp_path: Path) -> None:
    """``load_adapter`` (what ``python -m dora_lab.export --to merged`` runs) reads the run's
    ``model.quantization`` and loads the base in 4 bits again, the base the adapter trained on; the
    merged model then equals the adapted one, where merging into the float32 base would not."""
    from dora_lab.export.checkpoint import load_adapter

    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", [
        f"model.name={llama}", f"output_dir={tmp_path}", "task.max_train_samples=16", "task.max_eval_samples=8",
        "task.max_length=64", "train.max_steps=3", "train.batch_size=8", "train.eval_every=3",
        "schedule.interval=1", "train.lr=0.05", "model.quantization={compute_dtype: float32}"])
    train_run(cfg, tmp_path / "run", progress=False)
    model = load_adapter(tmp_path / "run" / "adapter").eval()
    assert is_quantized(model) and adapter_layers(model)
    with torch.no_grad():
        for layer in adapter_layers(model).values():  # a visible update, whatever three steps learned
            layer.c.normal_(0.0, 1.0)
    _, tokenizer = load_model_and_tokenizer(str(llama), 0, causal=True)
    ids = batch(tokenizer)["input_ids"]
    with torch.no_grad():
        adapted = model(ids).logits
        merged = merged_model(model)(ids).logits
        full = AutoModelForCausalLM.from_pretrained(llama).eval()
        for name, layer in adapter_layers(model).items():
            full.get_submodule(name).weight.add_(layer.delta_weight())
        original = full(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4), (merged - adapted).abs().max()
    assert (original - adapted).abs().max() > 100 * (merged - adapted).abs().max()
