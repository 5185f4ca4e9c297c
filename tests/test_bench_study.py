"""benchmarks/bench_study.py on a tiny BERT: both arms run their trials for real (not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from tiny import COLA, make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_study import summarize  # noqa: E402


def test_summarize_divides_per_arm() -> None:
    trials = [{"arm": "dora_lab", "wall_s": 10.0, "cpu_s": 4.0}, {"arm": "dora_lab", "wall_s": 30.0, "cpu_s": 12.0},
              {"arm": "peft", "wall_s": 40.0, "cpu_s": 12.0}]
    s = summarize(trials)
    assert s["arms"]["dora_lab"]["trials_per_hour"] == 180.0  # 3600 / mean 20 s
    assert s["arms"]["peft"]["trials_per_cpu_hour"] == 300.0  # 3600 / 12 CPU-s; dora_lab 3600 / 8 = 450
    assert s["ratio_dora_lab_over_peft"] == {"trials_per_hour": 2.0, "trials_per_cpu_hour": 1.5}


def test_a_tiny_run_runs_both_arms(tmp_path: Path) -> None:
    if not (COLA / "train.jsonl").exists():
        pytest.skip(f"no CoLA data at {COLA}")
    model = make_tiny_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_study.py"), "--trials", "1", "--steps",
                           "2", "--train-samples", "64", "--eval-samples", "32", "--model", str(model), "--data",
                           str(COLA), "--work", str(work), "--out", str(tmp_path), "--name", "smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
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
