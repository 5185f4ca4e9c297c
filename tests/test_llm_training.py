"""LLM-scale switches: gradient checkpointing through the adapters, bfloat16 base weights with float32
adapters (model.dtype), and the peak memory in a run's metrics."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import pytest
import torch
from conftest import DECODERS, VOCAB, randomize_c, tiny_decoder
from safetensors.torch import load_file

from dora_lab import adapter_layers, inject_adapters
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))


def _adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same adapter-dropout masks in both runs
    model(input_ids=ids, labels=ids).loss.backward()
    return {f"{n}.{t}": getattr(layer, t).grad.clone() for n, layer in adapter_layers(model).items()
            for t in ("A", "B", "c")}


@pytest.mark.parametrize("kind", DECODERS)
def test_gradient_checkpointing_recomputes_and_gives_the_same_adapter_gradients(kind: str) -> None:
    """Non-reentrant checkpointing (what train.gradient_checkpointing turns on) with frozen embeddings:
    the adapters still get gradients, equal to those without it, dropout masks replayed included."""
    model = tiny_decoder(kind)
    inject_adapters(model, r0=3, dropout=0.1)
    randomize_c(model)
    model.train()
    calls = []
    first = next(iter(adapter_layers(model).values()))
    first.register_forward_hook(lambda *_: calls.append(1))
    ids = _ids()
    plain = _adapter_grads(model, ids)
    assert len(calls) == 1
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls.clear()
    checkpointed = _adapter_grads(model, ids)
    assert len(calls) == 2  # the layer ran again in the backward pass: checkpointing is on
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", DECODERS)
def test_bfloat16_base_with_float32_adapters(kind: str) -> None:
    """The adapters stay float32 on a bf16 model; the output is the float32 model's (whose base
    weights are the same bf16 numbers) to bf16 rounding, with and without autocast, and the
    gradients arrive in float32."""
    model = tiny_decoder(kind, dtype=torch.bfloat16)
    reference = tiny_decoder(kind, dtype=torch.bfloat16).float()
    torch.manual_seed(1)
    layers = inject_adapters(model, r0=3, dropout=0.0, dtype=torch.float32)
    torch.manual_seed(1)
    inject_adapters(reference, r0=3, dropout=0.0)
    for m in (model, reference):  # an update of the base's order: bf16 rounding stays comparable
        randomize_c(m)
        with torch.no_grad():
            for layer in adapter_layers(m).values():
                layer.c.mul_(0.05)
    for layer in layers.values():
        assert layer.base.weight.dtype == torch.bfloat16
        assert layer.A.dtype == layer.B.dtype == layer.c.dtype == torch.float32
    ids = _ids(1)
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
        assert (ref - tiny_decoder(kind, dtype=torch.bfloat16).float()(input_ids=ids).logits).abs().max() > 0.1
        out = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(input_ids=ids).logits
    scale = float(ref.abs().max())
    for got in (out, auto):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, rtol=0, atol=0.03 * scale)  # measured: 1.2%
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    for layer in layers.values():
        assert layer.A.grad is not None and layer.A.grad.dtype == torch.float32
        assert torch.isfinite(layer.A.grad).all() and layer.c.grad.abs().sum() > 0


def test_bfloat16_with_fp16_autocast_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model: .*model.dtype bfloat16 .* model.precision fp16"):
        load_config(None, ["model.dtype=bfloat16", "model.precision=fp16"])
    assert load_config(None, ["task.max_length=2048"]).task.max_length == 2048


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_run_with_bf16_weights_and_checkpointing_logs_its_peak_memory(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "bert")
    cfg = load_config(REPO / "configs" / "cola.yaml", [
        *tiny_overrides(model_dir, tmp_path, train=64, evals=32), "model.dtype=bfloat16",
        "train.gradient_checkpointing=true", "train.max_steps=6", "train.lr=5e-3"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["peak_memory_source"] == "process_peak_rss_since_reset"  # this run's, not the process's
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # ru_maxrss is updated lazily by the kernel, VmHWM on reading: allow a few MiB of difference
    assert 50 < metrics["peak_memory_mb"] <= rss_mb + 8
    assert result.peak_memory_mb == pytest.approx(metrics["peak_memory_mb"], abs=0.1)
    assert result.active_components_final == 2 * 12 and all(
        torch.isfinite(torch.tensor(h["matthews_correlation"])) for h in result.history)
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert saved["bert.encoder.layer.0.attention.self.query.A"].dtype == torch.float32
    assert saved["classifier.weight"].dtype == torch.float32  # the head trains in float32 too


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
@pytest.mark.parametrize("method", ["eva", "fisher", "alora"])
def test_methods_that_run_the_model_outside_the_step_work_with_bf16_weights(tmp_path: Path, method: str) -> None:
    """eva's and fisher's calibration batches and alora's validation loss run the model outside the training step:
    with bf16 frozen weights and a float32 head they need the run's autocast like the step does."""
    model_dir = make_tiny_model_dir(tmp_path / "bert")
    cfg = load_config(REPO / "configs" / "cola.yaml", [
        *tiny_overrides(model_dir, tmp_path, train=64, evals=32), "model.dtype=bfloat16",
        f"method.name={method}", "train.max_steps=8", "schedule.interval=2"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert result.active_components_final <= 2 * 12
    assert all(math.isfinite(h["matthews_correlation"]) for h in result.history)
