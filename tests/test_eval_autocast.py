"""``eval.autocast``: evaluation under bf16 autocast (issue 27).

``auto`` is bf16 on CUDA and the training's precision on a CPU; ``bf16`` forces it, which lets a
CPU check the numbers: a tiny BERT's logits under CPU bf16 autocast have a median error within 2% of
the median float32 logit (bf16 keeps 8 bits of mantissa: 2^-8 relative rounding per operation) and the
same predicted label on at least 62 of 64 rows, and
a tiny run's evaluation metrics within 2 rows' worth of accuracy of the fp32 evaluation's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dora_lab.core.adapter import adapter_layers
from dora_lab.run.config import load_config
from dora_lab.run.config_eval import EvalConfig
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.evaluate import eval_autocast, predict
from dora_lab.run.train import train_run
from tests.conftest import adapted_bert
from tests.tiny import COLA, REPO, LossRecorder, make_tiny_model_dir, one_thread, tiny_overrides

CPU = torch.device("cpu")


def test_auto_is_bf16_on_cuda_only_and_off_keeps_the_training_precision() -> None:
    train = torch.autocast("cpu", enabled=False)
    assert eval_autocast(EvalConfig(), CPU, train) is train  # auto on a CPU: the training's
    assert eval_autocast(EvalConfig(autocast="off"), CPU, train) is train
    forced = eval_autocast(EvalConfig(autocast="bf16"), CPU, train)
    assert isinstance(forced, torch.autocast) and forced.fast_dtype == torch.bfloat16 and forced.device == "cpu"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        auto = eval_autocast(EvalConfig(), torch.device("cuda"), train)
        assert isinstance(auto, torch.autocast) and auto.fast_dtype == torch.bfloat16


def test_key_parses_and_a_wrong_value_is_refused() -> None:
    assert load_config(REPO / "configs" / "cola.yaml").eval.autocast == "auto"
    assert load_config(REPO / "configs" / "cola.yaml", ["eval.autocast=bf16"]).eval.autocast == "bf16"
    assert load_config(REPO / "configs" / "cola.yaml", ["eval.autocast=off"]).eval.autocast == "off"  # YAML's false
    with pytest.raises(ConfigError, match="eval.autocast"):
        load_config(REPO / "configs" / "cola.yaml", ["eval.autocast=fp8"])


def test_bf16_logits_are_within_tolerance_of_fp32() -> None:
    model = adapted_bert(r0=3, dtype=torch.float32)
    for layer in adapter_layers(model).values():  # non-zero adapters: their products run under autocast too
        torch.nn.init.normal_(layer.c.data)
    torch.nn.init.normal_(model.classifier.weight.data)  # logits of order 1, not 0.02's near-zero ones
    gen = torch.Generator().manual_seed(0)
    batches = [{"index": torch.arange(i * 16, (i + 1) * 16), "input_ids": torch.randint(0, 99, (16, 12), generator=gen),
                "attention_mask": torch.ones(16, 12, dtype=torch.long), "labels": torch.randint(0, 2, (16,), generator=gen)}
               for i in range(4)]
    fp32, _ = predict(model, batches, CPU, torch.autocast("cpu", enabled=False))
    bf16, _ = predict(model, batches, CPU, eval_autocast(EvalConfig(autocast="bf16"), CPU, None))
    assert bf16.dtype == fp32.dtype  # logits come back in float32 for the metrics
    assert not (bf16 == fp32).all()  # bf16 really ran
    error = np.abs(bf16 - fp32)
    assert np.median(error) <= 0.02 * np.median(np.abs(fp32))  # typical: under 1%
    assert (bf16.argmax(1) == fp32.argmax(1)).sum() >= 62  # of 64 rows (random ids: a few ill-conditioned)


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_a_run_evaluated_in_bf16_trains_alike_and_scores_within_tolerance(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "bert", init_range=0.2)
    runs = {}
    for mode in ("off", "bf16"):
        cfg = load_config(REPO / "configs" / "cola.yaml", [
            *tiny_overrides(model_dir, tmp_path), "train.max_steps=16", "train.lr=5e-3", f"eval.autocast={mode}"])
        losses = LossRecorder()
        with one_thread():
            runs[mode] = (train_run(cfg, tmp_path / mode, callbacks=[losses], progress=False), losses.values)  # type: ignore[list-item]
    (off, off_losses), (bf16, bf16_losses) = runs["off"], runs["bf16"]
    assert bf16_losses == off_losses  # evaluation's precision does not touch training
    assert bf16.allocation == off.allocation
    for a, b in zip([off.initial_metrics, *off.history], [bf16.initial_metrics, *bf16.history], strict=True):
        assert abs(a["accuracy"] - b["accuracy"]) <= 2 / 128  # 128 validation rows: two flipped predictions
        assert abs(a["matthews_correlation"] - b["matthews_correlation"]) <= 0.05
