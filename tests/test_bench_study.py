"""benchmarks/bench_study.py on a tiny BERT: both arms run their trials for real (not a timing test)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from tiny import COLA, make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_study import PEAK_LINE, cuda_peak_mib, dora_command, markdown, summarize, workers_used  # noqa: E402


def test_summarize_divides_per_arm() -> None:
    trials = [{"arm": "dora_lab", "wall_s": 10.0, "cpu_s": 4.0}, {"arm": "dora_lab", "wall_s": 30.0, "cpu_s": 12.0},
              {"arm": "peft", "wall_s": 40.0, "cpu_s": 12.0}]
    s = summarize(trials)
    assert s["arms"]["dora_lab"]["trials_per_hour"] == 180.0  # 3600 / mean 20 s
    assert s["arms"]["peft"]["trials_per_cpu_hour"] == 300.0  # 3600 / 12 CPU-s; dora_lab 3600 / 8 = 450
    assert s["ratio_dora_lab_over_peft"] == {"trials_per_hour": 2.0, "trials_per_cpu_hour": 1.5}


def test_the_packed_mode_compares_n_workers_with_one() -> None:
    """--mode packed: the ratio is the packed arm's trials per hour over one worker's, and its command
    runs the study on --dora-workers workers in a study folder of its own."""
    trials = [{"arm": "dora_lab", "n": 8, "wall_s": 80.0, "cpu_s": 80.0},
              {"arm": "dora_lab_packed", "n": 8, "wall_s": 16.0, "cpu_s": 96.0, "workers": 4}]
    s = summarize(trials, ("dora_lab_packed", "dora_lab"))
    assert s["ratio_dora_lab_packed_over_dora_lab"] == {"trials_per_hour": 5.0, "trials_per_cpu_hour": 0.833}
    args = argparse.Namespace(model="m", device="cuda", data="d", work="/w", train_samples=64, eval_samples=32,
                              steps=4)
    packed, one = dora_command(args, 8, "4"), dora_command(args, 8)
    assert packed[-2:] == ["--workers", "4"] and "--workers" not in one
    assert "output_dir=/w/dora_packed" in packed and "output_dir=/w/dora" in one and "model.device=cuda" in one
    assert workers_used("--workers auto: 6 worker(s) on one GPU: ...", "auto") == 6
    assert workers_used("", "3") == 3
    result = {"device": "cuda", "gpu": {"name": "NVIDIA H100", "memory_mib": 81559.0, "cuda": "13.0"},
              "machine": {"cpu_model": "x", "usable_cpus": 16, "torch": "t", "peft": "p", "transformers": "t",
                          "env": {}}, "command": "c", "seconds": 1.0, "shape": "s",
              "trials": [{**t, "mode": "packed", "round": 0, "load_before": 0.0, "load_after": 0.0,
                          "cuda_peak_mib": 900.0} for t in trials], "summary": {"packed": s}}
    md = markdown(result)
    assert "(cuda: NVIDIA H100, 81559 MiB, CUDA 13.0)" in md and "**5.0x** trials per hour" in md
    assert "at least 4x" in md and "| 4 | 900.0 |" in md


def test_cuda_peaks_are_read_from_the_peft_line_and_the_trials_metrics(tmp_path: Path) -> None:
    """PEFT's peak is the line its process prints; dora_lab's the largest peak_memory_mb of the trials'
    metrics.json written since the process started (an older trial's file is not this process's)."""
    args = argparse.Namespace(work=str(tmp_path))
    assert cuda_peak_mib("peft", args, f"noise\n{PEAK_LINE}1234.5\n", 0.0, "1") == 1234.5
    assert cuda_peak_mib("peft", args, "no line", 0.0, "1") is None
    for i, peak in enumerate((700.0, 950.5, 3000.0)):
        run = tmp_path / "dora" / "studies" / f"trial-{i:03d}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"peak_memory_mb": peak}))
    old = tmp_path / "dora" / "studies" / "trial-002" / "metrics.json"
    os.utime(old, (1.0, 1.0))  # written long before this process
    assert cuda_peak_mib("dora_lab", args, "", 1000.0, "1") == 950.5
    assert cuda_peak_mib("dora_lab_packed", args, "", 1000.0, "4") is None  # its own folder: dora_packed


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no GPU")
def test_cuda_without_a_gpu_is_refused_before_any_trial(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_study.py"), "--device", "cuda",
                           "--work", str(work), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --device cuda: torch.cuda.is_available() is False"), proc.stderr[-2000:]
    assert "--device cpu" in proc.stderr  # the fix, named
    assert not work.exists() and not (tmp_path / "out").exists()  # no trial, no result


def test_a_tiny_run_runs_both_arms(tmp_path: Path) -> None:
    if not (COLA / "train.jsonl").exists():
        pytest.skip(f"no CoLA data at {COLA}")
    model = make_tiny_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_study.py"), "--trials", "1", "--steps",
                           "2", "--train-samples", "64", "--eval-samples", "32", "--model", str(model), "--data",
                           str(COLA), "--work", str(work), "--out", str(tmp_path), "--name", "smoke", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["device"] == "cpu" and result["gpu"] is None
    assert all("cuda_peak_mib" not in t for t in result["trials"])
    assert [t["arm"] for t in result["trials"]] == ["dora_lab", "peft"]
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in result["trials"])
    assert result["machine"]["usable_cpus"] >= 1 and "load_before" in result["trials"][0]
    assert "trials per hour" in (tmp_path / "smoke.md").read_text()
    for db in ("peft.db", "dora/optuna.db"):  # each arm really ran one complete trial in its own study
        study = optuna.load_study(study_name="peft" if db == "peft.db" else "bench", storage=f"sqlite:///{work / db}")
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


def test_in_process_runs_each_arms_trials_in_one_process(tmp_path: Path) -> None:
    """--in-process: one process per arm, its two trials in it; the summary divides by its trials."""
    if not (COLA / "train.jsonl").exists():
        pytest.skip(f"no CoLA data at {COLA}")
    model = make_tiny_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_study.py"), "--in-process", "--trials",
                           "2", "--steps", "2", "--train-samples", "64", "--eval-samples", "32", "--model", str(model),
                           "--data", str(COLA), "--work", str(work), "--out", str(tmp_path), "--name", "smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert [(t["mode"], t["arm"], t["n"]) for t in result["trials"]] == [("in-process", "dora_lab", 2),
                                                                          ("in-process", "peft", 2)]
    arms = result["summary"]["in-process"]["arms"]
    assert arms["dora_lab"]["trials"] == 2
    assert arms["dora_lab"]["wall_s_per_trial"] == round(result["trials"][0]["wall_s"] / 2, 2)
    assert "in-process" in (tmp_path / "smoke.md").read_text()
    for db in ("peft.db", "dora/optuna.db"):  # each arm ran two complete trials in its one process
        study = optuna.load_study(study_name="peft" if db == "peft.db" else "bench", storage=f"sqlite:///{work / db}")
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
