"""The training loop of one run (:func:`dora_lab.run.train.train_run` sets it up and writes its files):
micro-batches -> optimizer step -> controller step -> periodic evaluation, for ``total`` optimizer
steps.  The controller runs after each optimizer step with the gradients still present; it counts
optimizer steps, not micro-batches.  What setting up built reaches the loop as one :class:`Run`;
what the loop measured comes back as one :class:`Trained`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.controller import PruningController
from . import distributed
from .callbacks import TrainCallback
from .compile import for_training
from .config import RunConfig
from .evaluate import evaluate
from .memory import peak_memory_mb, reset_peak
from .tasks import TaskSpec

__all__ = ["DivergenceError", "Run", "Trained", "train_loop"]


class DivergenceError(RuntimeError):
    """The loss became NaN/inf or exceeded ``train.divergence_loss``."""


@dataclass
class Run:
    """What setting up a run built (data, model, optimizer, controller), read by the loop and the finish."""

    cfg: RunConfig
    spec: TaskSpec
    device: torch.device
    run_dir: Path
    model: torch.nn.Module
    train_loader: Any
    eval_loaders: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    controller: PruningController | None
    generation: Any
    autocast: Any
    eval_autocast: Any
    total: int
    steps_per_epoch: int
    majority: float | None
    data_counts: dict[str, dict[str, int]]
    initial: dict[str, float]
    ddp: Any = None  # the model inside DDP (the model itself for one process), once the run begins


@dataclass
class Trained:
    """What the loop measured: every evaluation, the best one (its metric with the sign that makes ">"
    better, its step, the trainable weights then), the training rows this rank saw, the peak memory."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-math.inf, -1, {})
    rows: int = 0
    peak: tuple[float, str] = (0.0, "")


def _micro_batches(loader: Any, start_epoch: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    epoch = start_epoch
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def train_loop(run: Run, callbacks: Sequence[TrainCallback], progress: bool) -> Trained:
    """Train ``run.total`` optimizer steps, evaluating every ``train.eval_every`` and at the end."""
    cfg, device, controller = run.cfg, run.device, run.controller
    optimizer, scheduler = run.optimizer, run.scheduler
    rank0 = distributed.is_main()
    # fp16 needs loss scaling or small gradients flush to zero; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.model.precision == "fp16")
    trained = Trained()
    batches = _micro_batches(run.train_loader)
    scored = run.controller is not None and run.controller.method.uses_scorer  # name the scorer where it matters
    what = f"{cfg.method.name} {cfg.scorer.name}/{cfg.schedule.name}" if scored else cfg.method.name
    bar = tqdm(total=run.total, desc=f"{cfg.task.name} {what} seed {cfg.seed}",
               disable=not (progress and rank0), dynamic_ncols=True)
    run.model.train()
    reset_peak(device)
    for step in range(run.total):
        epoch, loss_sum = _accumulate(run, batches, scaler, trained)
        loss_sum = distributed.all_mean(loss_sum, device)  # the global batch's loss, the same on every rank
        if not math.isfinite(loss_sum) or loss_sum > cfg.train.divergence_loss:
            raise DivergenceError(f"training diverged at step {step}: loss {loss_sum}; lower train.lr")
        scaler.unscale_(optimizer)  # clipping and the scorers see true gradients (a no-op unless fp16)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.is_enabled() and scaler.get_scale() < scale  # fp16 overflow: no update was made
        state = controller.step(optimizer, update_scores=not skipped) if controller is not None else None
        if controller is not None and state is not None and state.pruned and state.frozen and controller.compact_at_end:
            run.ddp = for_training(distributed.wrap(run.model, device), cfg.train.compile)  # new parameters: DDP must hold those
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {"train_loss": loss_sum, "lr": float(scheduler.get_last_lr()[0]), "epoch": float(epoch)}
        if state is not None:
            logs.update(active_components=float(state.active_components),
                        active_parameters=float(state.active_parameters), budget=float(state.budget))
        for cb in callbacks:
            cb.on_step(step, logs)
        bar.update(1)
        if rank0 and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == run.total):
            _evaluate(run, trained, step, loss_sum, bar, callbacks)
    bar.close()
    trained.peak = peak_memory_mb(device)
    return trained


def _accumulate(run: Run, batches: Iterator[tuple[int, dict[str, torch.Tensor]]], scaler: Any,
                trained: Trained) -> tuple[int, float]:
    """One optimizer step's ``train.grad_accum`` micro-batches, forward and backward; their epoch and
    this rank's loss (counting the rows seen in ``trained.rows``)."""
    cfg, device, controller = run.cfg, run.device, run.controller
    loss_sum = 0.0
    for micro in range(cfg.train.grad_accum):
        epoch, batch = next(batches)
        trained.rows += len(batch["index"])  # rows, not packed sequences
        batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
        # DDP averages the gradients once, in the last micro-batch's backward
        with distributed.no_sync(run.ddp, micro + 1 < cfg.train.grad_accum):
            with run.autocast:
                loss = run.ddp(**batch).loss / cfg.train.grad_accum
                if controller is not None:
                    loss = loss + controller.regularization_loss().to(loss.device) / cfg.train.grad_accum
            scaler.scale(loss).backward()
        loss_sum += float(loss.detach())
    return epoch, loss_sum


def _evaluate(run: Run, trained: Trained, step: int, loss_sum: float, bar: Any,
              callbacks: Sequence[TrainCallback]) -> None:
    """Evaluate after ``step``; keep the weights when pruning is done and the metric is the best yet."""
    spec, controller, model = run.spec, run.controller, run.model
    # the metric's sign flipped where lower is better (perplexity), so ">" is "better"
    sign = 1.0 if spec.greater_is_better else -1.0
    metrics = evaluate(model, run.eval_loaders, spec, run.device, run.eval_autocast, run.generation)
    metrics["step"] = float(step + 1)
    trained.history.append(metrics)
    pruning_done = controller is None or controller.settled
    if pruning_done and sign * metrics[spec.main_metric] > trained.best[0]:
        trained.best = (sign * metrics[spec.main_metric], step + 1, _trainable_state(model))
    bar.set_postfix(loss=f"{loss_sum:.3f}", **{spec.main_metric[:8]: f"{metrics[spec.main_metric]:.4f}"})
    for cb in callbacks:
        cb.on_evaluate(step + 1, metrics)
    model.train()


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
