"""The configurations timed for one model: the frozen-model floor, PEFT LoRA, dora_lab before
pruning, the two dora_r3 variants (plain forward, torch's dropout sampler), PEFT AdaLoRA and
dora_lab driven into their final phase, and dora_r3 with a pruning controller per scorer.  A
``Config`` holds one model with its optimizer and runs (and times, phase by phase) one training step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dora_lab
import dora_lab.core.adapter.layer as adapter_layer
from dora_lab import PruningController, RankOneLinear, adapter_layers, inject_adapters, make_scorer

from .device import synchronizer
from .setup import (
    ALPHA,
    DRIVE_END,
    DRIVE_TOTAL,
    DRIVE_WARMUP,
    DROPOUT,
    HIGH_RANK,
    LR,
    START_RANK,
    TARGET_RANK,
    TARGETS,
    WEIGHT_DECAY,
    Plan,
    share_frozen,
)

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
        self.device = next(self.model.parameters()).device  # the base model's: every copy shares it
        self.sync = synchronizer(self.device)  # on a GPU each phase's timer waits for its kernels
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.info.setdefault("trainable_parameters", sum(p.numel() for p in params))

    def step(self, batch: dict[str, torch.Tensor], record: bool = False) -> None:
        adapter_layer._FAST_CPU_DROPOUT = self.fast_dropout
        sync = self.sync
        try:
            sync()
            t0 = time.perf_counter()
            loss = self.model(**batch).loss
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            self.optimizer.step()
            sync()
            t3 = time.perf_counter()
            if self.after_optimizer is not None:
                self.after_optimizer(self.steps_done)
            sync()
            t4 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            sync()
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
    if plan.variants:  # torch's dropout sampler differs from the fast one on the CPU only
        cpu = next(base.parameters()).device.type == "cpu"
        configs += [plain_forward_config(base), *([torch_dropout_config(base)] if cpu else [])]
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
