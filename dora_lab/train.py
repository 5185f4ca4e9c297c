"""One training run, end to end: ``python -m dora_lab.train CONFIG [--set key=value ...]``.

Reads top to bottom: set up (seed, data, model, adapters, optimizer, controller), then the loop
(micro-batches -> optimizer step -> controller step -> periodic evaluation), then the run's
files.  The controller runs after each optimizer step with the gradients still present; it
counts optimizer steps, not micro-batches.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapter import count_parameters, inject_adapters
from .callbacks import RunInfo, RunResult, TrainCallback
from .checkpoint import save_adapter
from .config import ConfigError, RunConfig, load_config
from .controller import PruningController
from .data import load_splits, make_loader
from .evaluate import evaluate
from .models import load_model_and_tokenizer, resolve_device
from .optim import build_optimizer, lr_factor
from .scorers import make_scorer
from .seeding import seed_everything
from .tasks import get_task

__all__ = ["RUN_FILES", "DivergenceError", "RunDirExists", "claim_run_dir", "main", "train_run"]


class DivergenceError(RuntimeError):
    """The loss became NaN/inf or exceeded ``train.divergence_loss``."""


class RunDirExists(FileExistsError):
    """The run folder already holds a run's files; nothing was written."""


# every file and folder train_run writes into its run folder (plots/: the tracker's pictures)
RUN_FILES = ("config.yaml", "metrics.json", "allocation.json", "scores.json", "budget.json", "adapter", "plots")


def claim_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Make ``run_dir`` ready for a new run.  If it holds a run's files, raise :class:`RunDirExists`,
    or with ``overwrite`` remove exactly those files (other files in the folder stay): a new run never
    sits beside an old run's adapter or metrics."""
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if old and not overwrite:
        raise RunDirExists(f"run folder {str(run_dir)!r} already holds a run ({', '.join(p.name for p in old)}); "
                           "choose another folder, or pass --overwrite to replace that run")
    for path in old:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


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
) -> RunResult:
    """Train one model as ``cfg`` says; write its files to ``run_dir``; return what it measured.
    A ``run_dir`` that already holds a run is refused (:class:`RunDirExists`) before any work, unless
    ``overwrite``, which first removes that run's files."""
    t0 = time.time()
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(cfg)
    claim_run_dir(run_dir, overwrite)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    seed_everything(cfg.seed)
    spec = get_task(cfg.task.name)
    device = resolve_device(cfg.model.device)

    # -- data and model -------------------------------------------------------------------
    splits = load_splits(spec, cfg.task.data_dir, max_train_samples=cfg.task.max_train_samples,
                         max_eval_samples=cfg.task.max_eval_samples, seed=cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, spec.num_labels)
    seed_everything(cfg.seed)  # adapters' init must not depend on what loading consumed
    adapted = cfg.train.method == "adapter"
    if adapted:
        a = cfg.adapter
        inject_adapters(model, r0=a.r0, targets=a.targets, alpha=a.alpha, dropout=a.dropout, init=a.init,
                        trainable=cfg.model.trainable)
    model.to(device)
    train_loader = make_loader(splits["train"], spec, tokenizer, batch_size=cfg.train.batch_size,
                               max_length=cfg.task.max_length, shuffle=True,
                               group_by_length=cfg.train.group_by_length, seed=cfg.seed)
    eval_loaders = {
        name: make_loader(splits[name], spec, tokenizer, batch_size=cfg.train.eval_batch_size,
                          max_length=cfg.task.max_length, shuffle=False, group_by_length=True, seed=cfg.seed)
        for name in spec.eval_splits
    }
    micro_per_epoch = len(train_loader)
    steps_per_epoch = max(1, micro_per_epoch // cfg.train.grad_accum)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))

    # -- optimizer and controller ----------------------------------------------------------
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, cfg.train.warmup_ratio))
    controller = None
    if adapted:
        controller = PruningController(
            model, make_scorer(cfg.scorer.name, **cfg.scorer.params), cfg.schedule.name, total,
            target_rank=cfg.budget.target_rank, target_params=cfg.budget.target_params,
            warmup=cfg.schedule.warmup, final=cfg.schedule.final, interval=cfg.schedule.interval,
            regularizer=cfg.regularizer.name, reg_weight=cfg.regularizer.weight,
            compact=cfg.schedule.compact)
    counts = count_parameters(model)
    info = RunInfo(
        config=cfg.resolved(), run_dir=run_dir, total_steps=total, steps_per_epoch=steps_per_epoch,
        trainable_parameters=counts.trainable, adapter_parameters=counts.adapter_active,
        budget_curve=controller.schedule.curve() if controller else [],
        budget_unit=controller.unit if controller else "none",
    )
    for cb in callbacks:
        cb.on_train_begin(info)

    # -- the loop ----------------------------------------------------------------------------
    autocast = _autocast(cfg.model.precision, device)
    # fp16 needs loss scaling or small gradients flush to zero; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.model.precision == "fp16")
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] = (-math.inf, -1, {})  # metric, step, weights
    batches = _micro_batches(train_loader)
    bar = tqdm(total=total, desc=f"{cfg.task.name} {cfg.scorer.name}/{cfg.schedule.name} seed {cfg.seed}",
               disable=not progress, dynamic_ncols=True)
    model.train()
    for step in range(total):
        loss_sum = 0.0
        for _ in range(cfg.train.grad_accum):
            epoch, batch = next(batches)
            batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
            with autocast:
                loss = model(**batch).loss / cfg.train.grad_accum
                if controller is not None:
                    loss = loss + controller.regularization_loss().to(loss.device) / cfg.train.grad_accum
            scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
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
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {"train_loss": loss_sum, "lr": float(scheduler.get_last_lr()[0]), "epoch": float(epoch)}
        if state is not None:
            logs.update(active_components=float(state.active_components),
                        active_parameters=float(state.active_parameters), budget=float(state.budget))
        for cb in callbacks:
            cb.on_step(step, logs)
        bar.update(1)
        if (step + 1) % cfg.train.eval_every == 0 or step + 1 == total:
            metrics = evaluate(model, eval_loaders, spec, device, autocast)
            metrics["step"] = float(step + 1)
            history.append(metrics)
            pruning_done = controller is None or not controller.schedule.prunes or controller.frozen
            if pruning_done and metrics[spec.main_metric] > best[0]:
                best = (metrics[spec.main_metric], step + 1, _trainable_state(model))
            bar.set_postfix(loss=f"{loss_sum:.3f}", **{spec.main_metric[:8]: f"{metrics[spec.main_metric]:.4f}"})
            for cb in callbacks:
                cb.on_evaluate(step + 1, metrics)
            model.train()
    bar.close()

    # -- the run's files -----------------------------------------------------------------------
    counts = count_parameters(model)
    result = RunResult(
        metric_name=spec.main_metric, best_metric=float(best[0]), best_step=int(best[1]),
        final_metrics=history[-1], history=history,
        allocation=controller.allocation() if controller else {},
        trainable_parameters=info.trainable_parameters, adapter_parameters_final=counts.adapter_active,
        active_components_final=counts.active_components, steps=total, seconds=time.time() - t0,
        run_dir=run_dir,
    )
    _write_outputs(run_dir, result, controller)
    if adapted and cfg.train.save_adapter and best[2]:
        _load_trainable_state(model, best[2])  # keep the best evaluation's weights, not the last
        save_adapter(model, run_dir / "adapter", base_model=cfg.model.name, num_labels=spec.num_labels,
                     extra={"config": cfg.resolved(), "metrics": result.summary()})
    for cb in callbacks:
        cb.on_train_end(result)
    return result


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
            {"scorer": controller.scorer.name, "scores": controller.component_scores(),
             "kept_components": masks}, indent=1))
        (run_dir / "budget.json").write_text(json.dumps(
            {"unit": controller.unit, "curve": controller.schedule.curve()}))


def _default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output_dir) / "runs" / f"{stamp}-{cfg.task.name}-{cfg.scorer.name}-{cfg.schedule.name}-s{cfg.seed}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dora_lab.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML run config, e.g. configs/cola.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path), e.g. --set train.lr=3e-4")
    parser.add_argument("--run-dir", default=None, help="where to write the run's files")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.run_dir is not None:  # refused before any work, not after training
            claim_run_dir(Path(args.run_dir), args.overwrite)
    except (ConfigError, RunDirExists) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cfg.to_yaml())
    result = train_run(cfg, args.run_dir, overwrite=args.overwrite)
    print(json.dumps(result.summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
