"""The HF ``Trainer`` with DoraTrainerCallback prunes like the plain loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from dora_lab import PruningController, adapter_layers, inject_adapters, make_scorer
from dora_lab.run.data import load_splits
from dora_lab.run.hf_callback import DoraTrainerCallback
from dora_lab.run.tasks import get_task
from tests.tiny import COLA, make_tiny_model_dir

pytestmark = pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")


def test_trainer_callback_prunes_like_the_plain_loop(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "bert")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_splits(get_task("cola"), COLA, max_train_samples=96, max_eval_samples=8)["train"]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)
    dataset = Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})

    def build(total: int, model: torch.nn.Module) -> PruningController:
        # sensitivity reads .grad: it raises if the callback ran after the gradients were cleared
        return PruningController(model, make_scorer("sensitivity"), "dora", total, target_rank=1,
                                 warmup=2, final=4, interval=2)

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    inject_adapters(model, r0=3, trainable=["classifier", "pooler"])
    # The plain-loop reference: the same schedule on the same layers, as the plain loop steps it.
    reference = build(12, model).schedule
    expected = [(reference.budget(t), reference.is_prune_step(t)) for t in range(12)]
    callback = DoraTrainerCallback(lambda total: build(total, model))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[callback]).train()

    seen = [(info.budget, info.pruned) for info in callback.history]
    assert seen == expected  # one controller step per optimizer step, same budgets, same prune steps
    assert [info.active_components for info in callback.history][-1] == 12  # target rank 1 x 12 layers
    layers = adapter_layers(model).values()
    assert sum(layer.rank for layer in layers) == 12  # compacted: only the 12 kept components remain
    assert all(layer.hard_mask and layer.rank == layer.active_rank for layer in layers)


@pytest.mark.parametrize(("method", "state"), [("eva", "ratios"), ("fisher", "fisher")])
def test_trainer_callback_feeds_a_one_shot_method_its_training_batches(tmp_path: Path, method: str,
                                                                        state: str) -> None:
    """A one-shot method reads the Trainer's own training batches (fisher: their loss, so the labels
    too) in on_train_begin, before the first step."""
    from dora_lab import make_method

    model_dir = make_tiny_model_dir(tmp_path / "bert")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_splits(get_task("cola"), COLA, max_train_samples=64, max_eval_samples=8)["train"]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)
    dataset = Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    inject_adapters(model, r0=3, trainable=["classifier", "pooler"])
    callback = DoraTrainerCallback(lambda total: PruningController(
        model, make_scorer("magnitude"), "dora", total, target_rank=1.5, warmup=1, final=2, interval=1,
        method=make_method(method, batches=2)))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[callback]).train()
    assert callback.controller is not None and getattr(callback.controller.method, state)
    assert [(i.pruned, i.frozen) for i in callback.history] == [(True, True)] + [(False, True)] * 3
    assert sum(layer.rank for layer in adapter_layers(model).values()) == 18  # 1.5 x 12, compacted at step 0
