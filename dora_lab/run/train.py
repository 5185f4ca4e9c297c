"""One training run, end to end: ``python -m dora_lab.train CONFIG [--set key=value ...]``.

Reads top to bottom: set up (seed, data, model, adapters, optimizer, controller), then the loop
(micro-batches -> optimizer step -> controller step -> periodic evaluation), then the run's
files.  The controller runs after each optimizer step with the gradients still present; it
counts optimizer steps, not micro-batches.

Under ``torchrun --nproc-per-node N`` (or with ``train.processes: N``, which relaunches this command
under torchrun) the run is data-parallel: each rank trains on its part of every global batch of
``N * train.batch_size`` rows inside DDP, every rank applies rank 0's pruning decision, and rank 0
alone evaluates, calls the callbacks and writes the run's files (:mod:`dora_lab.run.distributed`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.adapter import count_parameters, inject_adapters
from ..core.checkpoint import save_adapter
from ..core.controller import PruningController
from . import convergence, distributed
from .batching import loader_of
from .callbacks import EventLog, RunInfo, RunResult, TrainCallback
from .cli import INPUT_ERRORS, check_writable_folder, failed, refuse, stop_code, stoppable
from .config import ConfigError, RunConfig, build_controller, load_config
from .evaluate import evaluate, generation_eval, initial_evaluation
from .memory import peak_memory_mb, reset_peak
from .models import check_model, load_model_and_tokenizer, resolve_device
from .optim import build_optimizer, lr_factor
from .packing import check_packing
from .run_dir import RUN_FILES, RunDirExists, check_run_dir, claim_run_dir  # noqa: F401  (re-exported)
from .seeding import seed_everything
from .tasks import get_task
from .token_cache import encoded_splits, load_rows
from .validation import ValidationLoss

__all__ = ["RUN_FILES", "DivergenceError", "RunDirExists", "claim_run_dir", "main", "train_run"]


class DivergenceError(RuntimeError):
    """The loss became NaN/inf or exceeded ``train.divergence_loss``."""


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


def train_run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    callbacks: Sequence[TrainCallback] = (),
    progress: bool = True,
    overwrite: bool = False,
    data_cache: str | Path | None = None,
) -> RunResult:
    """Train one model as ``cfg`` says; write its files to ``run_dir``; return what it measured.
    A ``run_dir`` that already holds a run is refused (:class:`RunDirExists`) before any work, unless
    ``overwrite``, which first removes that run's files.  ``data_cache``: a folder of tokenised
    splits shared by a study's trials (:mod:`dora_lab.run.token_cache`), read or filled."""
    t0 = time.time()
    device = distributed.init_from_env(resolve_device(cfg.model.device))  # one process: unchanged
    rank0, shards, shard = distributed.is_main(), distributed.world_size(), distributed.rank()
    callbacks = callbacks if rank0 else ()  # the other ranks report through rank 0
    run_dir = distributed.broadcast_object(Path(run_dir) if run_dir is not None else _default_run_dir(cfg))
    if rank0:
        check_run_dir(run_dir, overwrite)  # refused before any work; the folder is made further down
    seed_everything(cfg.seed)
    spec = get_task(cfg.task.name)
    # a model that cannot train this task (a classifier for a causal task, a frozen new head) is
    # refused from its config alone, before the data is read
    check_model(cfg.model.name, task=spec, trainable=cfg.model.trainable, method=cfg.train.method)
    generation_eval(cfg.eval, spec)  # eval.generate on a task without responses: refused before the data

    # -- data and model -------------------------------------------------------------------
    # read before the model (bad data fails first), unless a study's cache may hold the token rows
    task_rows = load_rows(cfg, spec) if data_cache is None else None
    bf16_weights = cfg.model.dtype == "bfloat16"  # frozen weights in bf16; what trains stays float32
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, spec.num_labels, max_length=cfg.task.max_length,
                                                causal=spec.is_causal,
                                                **({"dtype": torch.bfloat16} if bf16_weights else {}))
    seed_everything(cfg.seed)  # adapters' init must not depend on what loading consumed
    adapted = cfg.train.method == "adapter"
    if adapted:
        a = cfg.adapter
        try:
            inject_adapters(model, r0=a.r0, targets=a.targets, alpha=a.alpha, dropout=a.dropout, init=a.init,
                            trainable=cfg.model.trainable, dtype=torch.float32 if bf16_weights else None)
        except ValueError as exc:  # no family default, or targets that match nothing: bad input, exit 2
            raise ConfigError(f"adapter.targets: {exc}") from None
    if bf16_weights:
        _trainable_to_float32(model)
    model.to(device)
    if cfg.train.gradient_checkpointing:
        # non-reentrant: works with a frozen embedding and under DDP (peft#1745's "marked ready twice")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoded = encoded_splits(cfg, spec, tokenizer, data_cache, task_rows)
    train_loader = loader_of(encoded["train"], spec, tokenizer, batch_size=cfg.train.batch_size, shuffle=True,
                             group_by_length=cfg.train.group_by_length, seed=cfg.seed, shards=shards, shard=shard,
                             packing=cfg.train.packing, max_length=cfg.task.max_length)
    if cfg.train.packing:  # refused (exit 2) unless packed rows stay apart in this model
        check_packing(model, train_loader, device)
    eval_loaders = {  # sorted by length, longest first: least padding
        name: loader_of(encoded[name], spec, tokenizer, batch_size=cfg.train.eval_batch_size, shuffle=False,
                        group_by_length=True, seed=cfg.seed)
        for name in spec.eval_splits
    }
    majority = None if spec.is_regression or spec.is_instruction else convergence.majority_share(
        convergence.eval_labels(encoded[spec.eval_splits[0]], task_rows, spec.eval_splits[0]))  # of the split the metric is on
    data_counts = _truncation_counts({"train": train_loader, **eval_loaders}, cfg.task.max_length, rank0)
    micro_per_epoch = len(train_loader)
    steps_per_epoch = max(1, micro_per_epoch // cfg.train.grad_accum)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))

    # -- optimizer and controller ----------------------------------------------------------
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, cfg.train.warmup_ratio))
    controller = None
    if adapted:
        controller = build_controller(cfg, model, total, agree=distributed.agree if shards > 1 else None)
        if controller.method.calibration_batches:  # a one-shot allocator reads a few batches (before DDP
            model.eval()                            # wraps the model, so rank 0's ranks and A reach all)
            def run_batch(b: dict[str, torch.Tensor]) -> Any:  # the output, with the batch's loss
                with _autocast("bf16" if bf16_weights else cfg.model.precision, device):
                    return model(**{k: v.to(device) for k, v in b.items() if k != "index"})
            controller.before_training(run_batch, train_loader)
        if controller.method.needs_validation:  # one fixed validation batch, spread over the split (checked: one exists)
            rows = controller.method.validation_rows or cfg.train.eval_batch_size
            vbatches = [{k: v.to(device) for k, v in b.items() if k != "index"}
                        for b in eval_loaders[spec.eval_splits[0]].spread_batches(rows)]
            controller.set_validation(ValidationLoss(
                model, vbatches, _autocast("bf16" if bf16_weights else cfg.model.precision, device)))
    generation = generation_eval(cfg.eval, spec, tokenizer, cfg.seed, cfg.train.eval_batch_size)
    autocast = _autocast("bf16" if bf16_weights else cfg.model.precision, device)
    initial = initial_evaluation(model, eval_loaders, spec, device, autocast, generation) \
        if cfg.eval.at_start and rank0 else {}
    # the run's folder only now: bad data, a missing model or a schedule that cannot fit leave nothing behind
    if rank0:
        claim_run_dir(run_dir, overwrite)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    ddp = distributed.wrap(model, device)  # the model itself for one process
    if shard > 0:
        torch.manual_seed(cfg.seed + 1_000_003 * shard)  # each rank its own dropout masks
    counts = count_parameters(model)
    info = RunInfo(
        config=cfg.resolved(), run_dir=run_dir, total_steps=total, steps_per_epoch=steps_per_epoch,
        trainable_parameters=counts.trainable, adapter_parameters=counts.adapter_active,
        budget_curve=controller.budget_curve() if controller else [],
        budget_unit=controller.unit if controller else "none", initial_metrics=initial,
    )
    for cb in callbacks:
        cb.on_train_begin(info)

    # -- the loop ----------------------------------------------------------------------------
    # fp16 needs loss scaling or small gradients flush to zero; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.model.precision == "fp16")
    history: list[dict[str, float]] = []
    # metric, step, weights; the metric's sign flipped where lower is better (perplexity), so ">" is "better"
    sign = 1.0 if spec.greater_is_better else -1.0
    best: tuple[float, int, dict[str, torch.Tensor]] = (-math.inf, -1, {})
    batches = _micro_batches(train_loader)
    what = f"{cfg.scorer.name}/{cfg.schedule.name}" if cfg.method.name == "dora" else cfg.method.name
    bar = tqdm(total=total, desc=f"{cfg.task.name} {what} seed {cfg.seed}",
               disable=not (progress and rank0), dynamic_ncols=True)
    model.train()
    rows = 0  # training rows this rank has seen (a rank's share of the global batches)
    reset_peak(device)
    for step in range(total):
        loss_sum = 0.0
        for micro in range(cfg.train.grad_accum):
            epoch, batch = next(batches)
            rows += len(batch["index"])  # rows, not packed sequences
            batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
            # DDP averages the gradients once, in the last micro-batch's backward
            with distributed.no_sync(ddp, micro + 1 < cfg.train.grad_accum):
                with autocast:
                    loss = ddp(**batch).loss / cfg.train.grad_accum
                    if controller is not None:
                        loss = loss + controller.regularization_loss().to(loss.device) / cfg.train.grad_accum
                scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
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
            ddp = distributed.wrap(ddp, device)  # compaction made new parameters: DDP must hold those
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {"train_loss": loss_sum, "lr": float(scheduler.get_last_lr()[0]), "epoch": float(epoch)}
        if state is not None:
            logs.update(active_components=float(state.active_components),
                        active_parameters=float(state.active_parameters), budget=float(state.budget))
        for cb in callbacks:
            cb.on_step(step, logs)
        bar.update(1)
        if rank0 and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == total):
            metrics = evaluate(model, eval_loaders, spec, device, autocast, generation)
            metrics["step"] = float(step + 1)
            history.append(metrics)
            pruning_done = controller is None or controller.settled
            if pruning_done and sign * metrics[spec.main_metric] > best[0]:
                best = (sign * metrics[spec.main_metric], step + 1, _trainable_state(model))
            bar.set_postfix(loss=f"{loss_sum:.3f}", **{spec.main_metric[:8]: f"{metrics[spec.main_metric]:.4f}"})
            for cb in callbacks:
                cb.on_evaluate(step + 1, metrics)
            model.train()
    bar.close()
    peak = peak_memory_mb(device)

    # -- the run's files -----------------------------------------------------------------------
    history = distributed.broadcast_object(history)  # every rank returns rank 0's result
    best = (*distributed.broadcast_object(best[:2]), best[2])
    parallel = distributed.check_consistent(model, controller.allocation() if controller else {}, rows)
    counts = count_parameters(model)
    result = RunResult(
        metric_name=spec.main_metric, best_metric=sign * float(best[0]), best_step=int(best[1]),
        final_metrics=history[-1], history=history,
        allocation=controller.allocation() if controller else {},
        trainable_parameters=info.trainable_parameters, adapter_parameters_final=counts.adapter_active,
        active_components_final=counts.active_components, steps=total, seconds=time.time() - t0,
        run_dir=run_dir, peak_memory_mb=peak[0], peak_memory_source=peak[1], data=data_counts,
        checks=convergence.checks(history, spec.main_metric, spec.greater_is_better, majority),
        initial_metrics=initial,
    )
    if not rank0:
        return result
    _write_outputs(run_dir, result, controller)
    if shards > 1:
        (run_dir / "distributed.json").write_text(json.dumps(parallel, indent=1))
    if adapted and cfg.train.save_adapter and best[2]:
        _load_trainable_state(model, best[2])  # keep the best evaluation's weights, not the last
        save_adapter(model, run_dir / "adapter", base_model=cfg.model.name,
                     num_labels=0 if spec.is_causal else spec.num_labels,
                     extra={"config": cfg.resolved(), "metrics": result.summary()})
    for cb in callbacks:
        cb.on_train_end(result)
    return result


@torch.no_grad()
def _trainable_to_float32(model: torch.nn.Module) -> None:
    """``model.dtype: bfloat16``: the trained parameters (adapters, head) stay float32 master weights, so
    AdamW's small updates are not rounded away; the forward pass casts them under bf16 autocast."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _truncation_counts(loaders: dict[str, Any], max_length: int, log: bool) -> dict[str, dict[str, int]]:
    """A causal task's per-split counts of examples, prompts cut from the left and answers dropped
    (:mod:`dora_lab.run.causal`), logged when any was; ``{}`` for a classifier."""
    counts = {split: dict(loader.dataset.causal.counts) for split, loader in loaders.items()
              if getattr(loader.dataset, "causal", None) is not None}
    for split, c in counts.items():
        if log and (c["prompts_cut"] or c["answers_dropped"]):
            print(f"dora_lab: {split}: {c['prompts_cut']} of {c['examples']} prompts cut from the left to fit "
                  f"task.max_length={max_length}; {c['answers_dropped']} examples dropped (answer alone too long)",
                  file=sys.stderr)
    return counts


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in state and state[name].shape == p.shape:
            p.copy_(state[name])


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _write_outputs(run_dir: Path, result: RunResult, controller: PruningController | None) -> None:
    (run_dir / "metrics.json").write_text(json.dumps({**result.summary(), "history": result.history}, indent=1))
    if controller is not None:
        (run_dir / "allocation.json").write_text(json.dumps(result.allocation, indent=1))
        masks = {n: layer.index[layer.mask > 0].tolist() for n, layer in controller.layers.items()}
        (run_dir / "scores.json").write_text(json.dumps(
            {"method": controller.method.name, "scorer": controller.scorer.name,
             "scores": controller.component_scores(),
             "kept_components": masks}, indent=1))
        (run_dir / "budget.json").write_text(json.dumps(
            {"unit": controller.unit, "curve": controller.budget_curve()}))


def _default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    method = "" if cfg.method.name == "dora" else f"{cfg.method.name}-"
    return Path(cfg.output_dir) / "runs" / f"{stamp}-{cfg.task.name}-{method}{cfg.scorer.name}-{cfg.schedule.name}-s{cfg.seed}"


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dora_lab.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML run config, e.g. configs/cola.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path), e.g. --set train.lr=3e-4")
    parser.add_argument("--run-dir", default=None, help="where to write the run's files")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    args = parser.parse_args(argv)
    # bad input (config, data, model, output folder) exits 2 with nothing stored; a failure once
    # training runs exits 1 and says what the run folder keeps (dora_lab.run.cli)
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir is not None else _default_run_dir(cfg)
        check_writable_folder(run_dir, "--run-dir" if args.run_dir is not None else "output_dir")
        check_run_dir(run_dir, args.overwrite)  # refused before any work, not after training
    except (ConfigError, RunDirExists) as exc:
        return refuse(exc)
    if cfg.train.processes > 1 and not distributed.launched():  # relaunch this command under torchrun
        argv = list(sys.argv[1:] if argv is None else argv)
        return distributed.relaunch(cfg.train.processes, "dora_lab.train", argv)
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed.launched() and cfg.train.processes > 1 and started != cfg.train.processes:
        return refuse(ConfigError(f"train.processes is {cfg.train.processes} but torchrun started {started} "
                                  "processes; set them alike (or leave train.processes at 1 under torchrun)"))
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(cfg.to_yaml())
    try:
        # a study trial run in several processes follows rank 0's hooks through this file
        events = [EventLog(os.environ["DORA_LAB_EVENTS"])] if os.environ.get("DORA_LAB_EVENTS") else []
        result = train_run(cfg, run_dir, events, overwrite=args.overwrite)
    except INPUT_ERRORS as exc:  # train_run raises these before it makes the run folder
        return refuse(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (stoppable)
        return failed(exc, run_dir, stop_code(exc))
    except Exception as exc:
        return failed(exc, run_dir)
    finally:
        distributed.shutdown()
    if main_rank:
        print(json.dumps(result.summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

