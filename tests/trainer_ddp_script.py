"""A Trainer run with DoraTrainerCallback, for tests/test_distributed.py to start under ``torchrun``
or ``accelerate launch`` (and once in one process): ``python tests/trainer_ddp_script.py MODEL OUT BATCH``.

Each rank writes ``OUT/rank<r>.pt``: its callback's history, allocation and trainable weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from dora_lab import PruningController, inject_adapters, make_scorer
from dora_lab.run.data import load_splits
from dora_lab.run.hf_callback import DoraTrainerCallback
from dora_lab.run.tasks import get_task
from tests.tiny import COLA


def main(model_dir: Path, out: Path, batch: int) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_splits(get_task("cola"), COLA, max_train_samples=64, max_eval_samples=8)["train"]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)
    dataset = Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    torch.manual_seed(0)
    inject_adapters(model, r0=3, dropout=0.0, trainable=["classifier", "pooler"])
    callback = DoraTrainerCallback(lambda total: PruningController(
        model, make_scorer("sensitivity"), "dora", total, target_rank=1, warmup=2, final=4, interval=1))
    # transformers 5 renamed gradient_checkpointing; non-reentrant is the form DDP accepts
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=10, per_device_train_batch_size=batch,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, seed=0, disable_tqdm=True, average_tokens_across_devices=False,
                             **{ckpt: True, f"{ckpt}_kwargs": {"use_reentrant": False}})
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[callback]).train()
    assert callback.controller is not None
    torch.save({"history": [(i.budget, i.pruned, i.active_components) for i in callback.history],
                "allocation": callback.controller.allocation(),
                "deferred": callback.deferred_compaction,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}},
               out / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
