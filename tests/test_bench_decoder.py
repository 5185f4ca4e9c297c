"""benchmarks/bench_decoder.py on a tiny Llama: runs without pydantic, Optuna, MLflow or datasets (the
GPU machine it is meant for has none of them), and its headline numbers are the ratios of its own
medians.  Not a timing test: no speed is asserted."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("pydantic", "optuna", "mlflow", "datasets")

# the blocked packages look absent (a None in sys.modules: import fails, find_spec answers None), then
# the script runs as __main__
RUNNER = f"""
import sys, runpy
for name in {BLOCKED!r}:
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "decoder.json"
    cmd = [sys.executable, "-c", RUNNER, str(REPO / "benchmarks" / "bench_decoder.py"), "--model", "tiny",
           "--device", "cpu", "--batch", "2", "--seq", "16", "--rounds", "2", "--block", "1", "--warmup", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_configuration_is_timed_and_measured(result: dict) -> None:
    configs = result["configurations"]
    assert list(configs) == ["peft_lora_r8", "dora_r8", "dora_r8_scoring", "peft_lora_r4", "dora_final"]
    for name, c in configs.items():
        assert c["n"] == len(c["step_ms"]) == 2 and all(t > 0 for t in c["step_ms"]), name
        assert c["median_ms"] == pytest.approx(statistics.median(c["step_ms"]))
        assert c["memory"]["step_peak_mib"] > 0, name
        assert "syncs_per_step" not in c  # counted on CUDA only
    # the tiny Llama: 2 layers, hidden 64, 4 heads, 2 key/value heads (k, v: 64 -> 32), MLP 128
    per_layer = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    lora = 2 * sum(i + o for i, o in per_layer)
    assert configs["peft_lora_r8"]["trainable_parameters"] == 8 * lora
    assert configs["dora_r8"]["trainable_parameters"] == 8 * (lora + 14)  # + one c per component
    # resting memory: float32 parameters, their gradients and AdamW's two moments (16 bytes each),
    # plus AdamW's one-element step counter per parameter tensor
    n = configs["peft_lora_r4"]["trainable_parameters"]
    assert configs["peft_lora_r4"]["memory"]["resting_mib"] * 2**20 == pytest.approx(16 * n + 4 * 28, abs=64)
    final = configs["dora_final"]
    assert final["average_rank"] == 4.0 and final["active_components"] == 4 * 14
    dims = dict(zip(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], per_layer,
                    strict=True))
    stored = final["allocation"]
    assert len(stored) == 14 and sum(stored.values()) == 4 * 14  # compacted: stored = active
    assert final["trainable_parameters"] == sum(
        r * (sum(dims[name.rpartition(".")[2]]) + 1) for name, r in stored.items())


def test_headline_ratios_are_the_medians_ratios(result: dict) -> None:
    med = {n: c["median_ms"] for n, c in result["configurations"].items()}
    head = result["headline"]
    assert head["time_ratio_dora_to_peft_before_pruning"] == pytest.approx(med["dora_r8"] / med["peft_lora_r8"])
    assert head["time_ratio_dora_to_peft_after_compaction"] == pytest.approx(med["dora_final"] / med["peft_lora_r4"])
    assert head["controller_share_of_step"] == pytest.approx(
        (med["dora_r8_scoring"] - med["dora_r8"]) / med["dora_r8_scoring"])
    configs = result["configurations"]  # --block 1: a round is one step of each configuration
    paired = statistics.median(d / p for d, p in zip(configs["dora_final"]["step_ms"], configs["peft_lora_r4"]["step_ms"],
                                                      strict=True))
    assert head["paired_time_ratio_after_compaction"] == pytest.approx(paired)
    scoring = result["configurations"]["dora_r8_scoring"]
    assert 0 < head["controller_step_host_ms"] == pytest.approx(scoring["phases_median_ms"]["controller"])
    assert result["model"]["layers"] == 2 and result["args"]["model"] == "tiny"
