"""The still-rising and majority-class flags (dora_lab.run.convergence): hand-worked histories, then a
tiny real run on the whole CoLA validation split whose metrics.json carries them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dora_lab.run.config import load_config
from dora_lab.run.convergence import at_chance, checks, majority_share, still_rising
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides


def test_plateau_is_not_rising() -> None:
    r = still_rising([0.1, 0.2, 0.25, 0.25, 0.251, 0.25])
    # window max(3, ceil(6 / 3)) = 3: 0.25, 0.251, 0.25 fit a flat line; the last is not a new best
    assert r["still_rising"] is False and r["window"] == 3
    assert r["fitted_rise"] == pytest.approx(0.0, abs=1e-12) and r["last_gain"] == pytest.approx(-0.001)


def test_a_new_best_at_the_last_evaluation_is_rising() -> None:
    r = still_rising([0.1, 0.15, 0.2, 0.3])
    assert r["still_rising"] is True and r["last_gain"] == pytest.approx(0.1)


def test_a_rising_trend_is_rising_though_the_last_is_not_the_best() -> None:
    # last third (3 evaluations) at steps 100, 200, 300: 0.1, 0.2, 0.19; slope (0.19 - 0.1) / 200 per step,
    # fitted rise over the 200 steps 0.09 > 0.005, while the last gain is -0.01
    r = still_rising([0.0, 0.0, 0.0, 0.1, 0.2, 0.19], steps=[0, 0, 0, 100, 200, 300])
    assert r["still_rising"] is True and r["last_gain"] == pytest.approx(-0.01)
    assert r["fitted_rise"] == pytest.approx(0.09)


def test_uneven_steps_and_the_tolerance() -> None:
    # 0.3, 0.3, 0.304 at steps 200, 300, 304 (a last evaluation 4 steps after the one before):
    # gain 0.004 < 0.005; the least-squares slope by hand: x mean 268, y mean 0.301333,
    # sxy = (-68)(-0.001333) + 32(-0.001333) + 36(0.002667) = 0.144, sxx = 4624 + 1024 + 1296 = 6944
    r = still_rising([0.3, 0.3, 0.3, 0.304], steps=[100, 200, 300, 304])
    assert r["fitted_rise"] == pytest.approx(0.144 / 6944 * 104, rel=1e-6)  # 0.00216
    assert r["still_rising"] is False and r["tolerance"] == 0.005
    assert still_rising([0.3, 0.3, 0.3, 0.306])["still_rising"] is True
    assert still_rising([50.0, 50.0, 50.0, 50.4])["tolerance"] == pytest.approx(0.504)  # 1% of the best
    assert still_rising([50.0, 50.0, 50.0, 50.4])["still_rising"] is False


def test_lower_is_better_and_too_few_evaluations() -> None:
    assert still_rising([20.0, 15.0, 12.0, 10.0], greater_is_better=False)["still_rising"] is True  # perplexity falls
    assert still_rising([10.0, 10.01, 10.0, 10.02], greater_is_better=False)["still_rising"] is False
    assert still_rising([0.1, 0.5])["still_rising"] is None
    assert still_rising([0.1, math.nan, 0.2, 0.3])["window"] == 3  # an undefined evaluation is left out


def test_majority_class_rule() -> None:
    share = majority_share([1] * 721 + [0] * 322)  # CoLA's validation split
    assert share == pytest.approx(721 / 1043)
    assert at_chance(0.0, "matthews_correlation") is True and at_chance(-0.02, "matthews_correlation") is True
    assert at_chance(0.01, "matthews_correlation") is False
    assert at_chance(721 / 1043, "accuracy", share) is True and at_chance(0.70, "accuracy", share) is False
    assert at_chance(0.9, "accuracy") is None and at_chance(0.5, "f1", share) is None
    assert checks([{"matthews_correlation": 0.0, "accuracy": 0.3, "step": 1.0}], "matthews_correlation", True,
                  share)["accuracy_at_majority"] is True


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_a_tiny_run_at_the_majority_class_says_so(tmp_path: Path) -> None:
    """A tiny BERT at its default init, barely trained, predicts one class on the whole validation
    split: MCC 0 and accuracy = one class's share (721 / 1043 or 322 / 1043), flagged in metrics.json."""
    model = make_tiny_model_dir(tmp_path / "bert")
    cfg = load_config(REPO / "configs" / "cola.yaml", [*tiny_overrides(model, tmp_path, train=64),
                                                        "task.max_eval_samples=null", "train.lr=1e-6",
                                                        "train.max_steps=9", "train.eval_every=3"])
    train_run(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (COLA / "validation.jsonl").read_text().splitlines() if line.strip()]
    share = sum(r["label"] == 1 for r in rows) / len(rows)
    last = saved["history"][-1]
    assert last["matthews_correlation"] == 0.0 and last["accuracy"] in (pytest.approx(share), pytest.approx(1 - share))
    flags = saved["checks"]
    assert flags["majority_share"] == pytest.approx(share) and flags["at_majority"] is True
    assert flags["accuracy_at_majority"] is True
    assert flags["still_rising"] is False  # 0, 0, 0: flat (3 evaluations at steps 3, 6, 9)
    assert [h["step"] for h in saved["history"]] == [3.0, 6.0, 9.0]


SST2 = COLA.parent / "sst2"


@pytest.mark.skipif(not SST2.is_dir(), reason=f"shared SST-2 data not found at {SST2}")
def test_the_sst2_config_runs_and_knows_its_majority_share(tmp_path: Path) -> None:
    """configs/sst2.yaml on a tiny BERT and the shared SST-2 (whole validation split: 444 of 872
    positive): accuracy is its metric and the majority share is the one counted from the file."""
    model = make_tiny_model_dir(tmp_path / "bert")
    cfg = load_config(REPO / "configs" / "sst2.yaml", [*tiny_overrides(model, tmp_path, train=64),
                                                        f"task.data_dir={SST2}", "task.max_eval_samples=null",
                                                        "train.max_steps=6", "train.eval_every=2"])
    assert cfg.task.name == "sst2" and cfg.task.max_train_samples == 64
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert result.metric_name == "accuracy" and result.checks["majority_share"] == pytest.approx(444 / 872)
    rows = [json.loads(line) for line in (SST2 / "validation.jsonl").read_text().splitlines() if line.strip()]
    assert sum(r["label"] for r in rows) == 444 and len(rows) == 872
    assert result.checks["at_majority"] is (result.final_metrics["accuracy"] <= 444 / 872 + 1e-9)
