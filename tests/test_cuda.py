"""The GPU path: the same adapter, controller, training run, checkpoint, merge and PEFT export on
CUDA, checked against the CPU.  Skipped on machines without a CUDA device (CI has none); run with
``python -m pytest tests/test_cuda.py`` on a GPU machine."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import adamw, adapted_bert, batches, randomize_c, train
from transformers import AutoModelForSequenceClassification

from dora_lab import PruningController, adapter_layers, make_scorer
from dora_lab.core.methods import list_methods
from dora_lab.export.checkpoint import load_adapter
from dora_lab.export.merge import merged_model
from dora_lab.export.peft import export_peft
from dora_lab.run.config import load_config
from dora_lab.run.train import train_run
from tests.tiny import REPO, make_tiny_model_dir, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _to(data: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.to(device), y.to(device)) for x, y in data]


def test_forward_and_gradients_match_cpu() -> None:
    cpu = adapted_bert(dtype=torch.float64)
    randomize_c(cpu)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x, y = batches(1, seed=3)[0]
    for model, device in ((cpu, torch.device("cpu")), (gpu, CUDA)):
        model(input_ids=x.to(device), labels=y.to(device)).loss.backward()
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        if p_cpu.grad is not None:
            assert p_gpu.grad is not None, name
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_pruning_on_cuda_makes_the_cpu_decisions(scorer_name: str) -> None:
    """Every registered scorer: the whole schedule (soft pruning, freeze, compaction with AdamW
    state) on the GPU keeps exactly the components the CPU keeps, and the state stays on the GPU."""
    data = batches(12, seed=1)
    runs = {}
    for device in (torch.device("cpu"), CUDA):
        model = adapted_bert(r0=4, dtype=torch.float64).to(device)
        randomize_c(model)
        model.train()
        opt = adamw(model)
        ctl = PruningController(model, make_scorer(scorer_name), "dora", len(data), target_rank=2,
                                warmup=0.25, final=0.25, interval=2)
        infos = train(model, opt, ctl, _to(data, device))
        runs[device.type] = (model, opt, ctl, infos)
    (m_cpu, _, c_cpu, i_cpu), (m_gpu, o_gpu, c_gpu, i_gpu) = runs["cpu"], runs["cuda"]
    assert c_gpu.frozen and i_gpu[-1].active_components == i_cpu[-1].active_components == 2 * len(c_gpu.layers)
    for name, layer in c_gpu.layers.items():
        torch.testing.assert_close(layer.index.cpu(), c_cpu.layers[name].index, msg=name)
        assert layer.A.shape[0] == layer.active_rank  # compacted
    for group in o_gpu.param_groups:
        for p in group["params"]:
            assert p.is_cuda
            for value in o_gpu.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.is_cuda and value.shape == p.shape
    x = batches(1, seed=9)[0][0]
    m_cpu.eval()
    m_gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(m_gpu(input_ids=x.to(CUDA)).logits.cpu(), m_cpu(input_ids=x).logits,
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", list_methods())
def test_every_allocation_method_trains_on_cuda(tmp_path: Path, method: str, dtype: str) -> None:
    """Every registered method (pool growth, proximal steps, one-shot calibration, validation scoring)
    runs a training on the GPU with float32 and bf16 frozen weights and ends within its budget
    (increlora's warm-up once mixed CPU step counts into CUDA weights)."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    cfg = load_config(REPO / "configs" / "cola.yaml", [
        *tiny_overrides(model_dir, tmp_path / "out", train=128, evals=64), "model.device=cuda",
        f"model.dtype={dtype}", f"method.name={method}", "train.max_steps=16"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert 0 < result.active_components_final <= 2 * len(result.allocation)
    assert all(math.isfinite(h["matthews_correlation"]) for h in result.history)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_run_on_cuda(tmp_path: Path, precision: str) -> None:
    """A full run on the GPU in each precision meets the budget; its saved adapter reloads on the
    CPU and on the GPU with the same predictions.  (Mixed-precision scores against fp32's:
    tests/test_train.py::test_mixed_precision_matches_fp32, which runs on cuda too.)"""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    cfg = load_config(REPO / "configs" / "cola.yaml", [
        *tiny_overrides(model_dir, tmp_path / "out"), "model.device=cuda", f"model.precision={precision}",
        "scorer.name=sensitivity",
    ])
    result = train_run(cfg, tmp_path / "run", progress=False)
    n_layers = len(result.allocation)
    assert sum(result.allocation.values()) == result.active_components_final == 2 * n_layers
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())["scores"]
    flat = torch.tensor([s for layer in scores.values() for s in layer])
    assert torch.isfinite(flat).all() and flat.max() > 0

    x = torch.randint(1, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for device in ("cpu", "cuda"):
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        model = load_adapter(tmp_path / "run" / "adapter", base).to(device).eval()
        with torch.no_grad():
            out[device] = model(input_ids=x.to(device)).logits.float().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-4, atol=1e-5)


def test_merge_and_peft_export_on_cuda(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model_dir = make_tiny_model_dir(tmp_path / "model", dropout=0.0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    from dora_lab import inject_adapters

    inject_adapters(model, r0=4, trainable=("classifier", "pooler"))
    randomize_c(model, 2)
    layers = adapter_layers(model)
    first = next(iter(layers.values()))
    first.freeze_mask(torch.tensor([True, False, True, False]))
    first.compact()
    model.to(CUDA).eval()
    x = torch.randint(1, 1000, (4, 16), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        merged = merged_model(model)
        torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=1e-4, atol=1e-5)
    export_peft(model, tmp_path / "peft", base_model=str(model_dir))
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").to(CUDA).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scorer_name", ["magnitude", "sensitivity"])
def test_no_host_device_sync_in_a_step_outside_prune_steps(scorer_name: str) -> None:
    """forward, backward, AdamW and controller.step() between prune steps never wait for the GPU
    (torch's sync debug mode raises on a synchronising call it detects); a prune step may."""
    from conftest import adapted_decoder, lm_batches

    for kind in ("llama",):  # the family checked on an H200 (benchmarks/results/bench_decoder_h200_check.md)
        model = adapted_decoder(kind, dtype=torch.float32, dropout=0.1).to(CUDA).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ctl = PruningController(model, make_scorer(scorer_name), "dora", 20, target_rank=2, warmup=2, final=4,
                                interval=5)
        data = _to(lm_batches(4), CUDA)
        torch.cuda.synchronize()
        for t, (x, y) in enumerate(data):
            prune = ctl.schedule.is_prune_step(ctl.t)
            torch.cuda.set_sync_debug_mode(0 if prune else "error")
            try:
                model(input_ids=x, labels=y).loss.backward()
                opt.step()
                info = ctl.step(opt)
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert info.pruned == prune, t


def test_one_shot_and_validation_scores_on_cuda_match_cpu() -> None:
    """eva's ratios (padding mask moved to the device), fisher's Fisher information and alora's
    stacked masked-out losses on CUDA, in float64, against the same on the CPU."""
    from dora_lab import make_method
    from dora_lab.run.validation import ValidationLoss

    g = torch.Generator().manual_seed(5)
    data = []
    for _ in range(2):
        mask = torch.ones(4, 8, dtype=torch.long)
        mask[0, 5:] = 0
        data.append({"input_ids": torch.randint(0, 100, (4, 8), generator=g), "attention_mask": mask,
                     "labels": torch.randint(0, 2, (4,), generator=g)})
    out: dict[str, list[Any]] = {}
    for device in (torch.device("cpu"), CUDA):
        results: list[Any] = []
        on = [{k: v.to(device) for k, v in b.items()} for b in data]
        for name in ("eva", "fisher"):
            model = adapted_bert(r0=3).to(device)
            ctl = PruningController(model, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                                    method=make_method(name, batches=2))
            ctl.before_training(lambda b, m=model: m(**b), on)
            results.append({n: v.cpu() for n, v in getattr(ctl.method, "ratios" if name == "eva" else "fisher").items()})
        model = adapted_bert(r0=3).to(device)
        randomize_c(model)
        layers = list(adapter_layers(model).values())
        for layer in layers:
            layer.hard_mask = True
        loss = ValidationLoss(model, on, torch.autocast(device.type, enabled=False), max_rows=12)
        results.append(torch.tensor(loss.without([(layer, i) for layer in layers for i in range(3)])))
        out[device.type] = results
    for cpu, gpu in zip(out["cpu"], out["cuda"], strict=True):
        if isinstance(cpu, dict):
            for n in cpu:
                torch.testing.assert_close(gpu[n], cpu[n], rtol=1e-5, atol=1e-8, msg=n)
        else:
            torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-12)
