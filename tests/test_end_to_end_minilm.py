"""End to end on the real pretrained MiniLM and the real CoLA: train, prune, save, reload.

About a minute on two CPU cores: 96 optimizer steps on 3,072 training sentences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dora_lab.export.checkpoint import load_adapter
from dora_lab.run.batching import make_loader
from dora_lab.run.config import load_config
from dora_lab.run.data import load_splits
from dora_lab.run.evaluate import predict
from dora_lab.run.tasks import compute_metrics, get_task
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, LossRecorder, minilm_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not COLA.is_dir(), reason=f"no shared CoLA at {COLA}")]


def test_minilm_cola_trains_prunes_and_reloads(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "cola.yaml", [
        f"model.name={minilm_dir()}", f"task.data_dir={COLA}", "task.max_train_samples=3072",
        "task.max_eval_samples=320", "train.epochs=1", "train.eval_every=48", "schedule.interval=4",
        f"output_dir={tmp_path}",
    ])
    losses = LossRecorder()
    result = train_run(cfg, tmp_path / "run", callbacks=[losses], progress=False)  # type: ignore[list-item]

    assert result.steps == 96 and len(losses.values) == 96
    assert sum(losses.values[-16:]) / 16 < sum(losses.values[:16]) / 16 - 0.02  # it learns
    assert result.active_components_final == 2 * 36  # 6 layers x 6 linears at average rank 2
    assert sorted(set(result.allocation.values())) != [2]  # the budget moved between layers

    # The saved best adapter reloads onto a fresh MiniLM and reproduces the best evaluation.
    model = load_adapter(tmp_path / "run" / "adapter", base_model=str(minilm_dir())).eval()
    from transformers import AutoTokenizer

    spec = get_task("cola")
    rows = load_splits(spec, COLA, max_eval_samples=320, seed=0)["validation"]
    loader = make_loader(rows, spec, AutoTokenizer.from_pretrained(minilm_dir()), batch_size=128,
                         max_length=64, shuffle=False)
    logits, labels = predict(model, loader, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    best = next(h for h in result.history if h["step"] == result.best_step)
    metric = compute_metrics(spec, logits, labels)["matthews_correlation"]
    assert metric == pytest.approx(best["matthews_correlation"], abs=1e-6)
