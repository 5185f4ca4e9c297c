"""One training run, end to end: ``python -m dora_lab.train CONFIG [--set key=value ...]``.

Reads top to bottom: :func:`train_run` checks its inputs, sets up (:func:`_set_up`: data, model,
adapters, optimizer, controller), begins (:func:`_begin`: the run's folder, DDP, the callbacks), runs
the loop (:func:`dora_lab.run.loop.train_loop`: micro-batches -> optimizer step -> controller step ->
periodic evaluation) and finishes (:func:`_finish`: the result and the run's files).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import count_parameters, inject_adapters
from ..core.checkpoint import save_adapter
from ..core.controller import PruningController
from ..core.methods import DEFAULT_METHOD
from . import convergence, distributed
from .batching import loader_of
from .callbacks import EventLog, RunInfo, RunResult, TrainCallback
from .cli import INPUT_ERRORS, check_writable_folder, failed, refuse, stop_code, stoppable
from .compile import check_compiler, for_training
from .config import RunConfig, build_controller, load_config
from .config_yaml import ConfigError
from .environment import environment
from .evaluate import eval_autocast, generation_eval, initial_evaluation
from .loop import Run, Trained, train_loop
from .models import check_model, load_model_and_tokenizer, resolve_device
from .optim import build_optimizer, lr_factor
from .packing import check_packing
from .quantization import quantized_load_kwargs, standard_layout
from .run_dir import RunDirExists, check_run_dir, claim_run_dir
from .seeding import seed_everything
from .tasks import TaskSpec, get_task
from .token_cache import encoded_splits, load_rows
from .validation import ValidationLoss

__all__ = ["main", "train_run"]


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
    rank0 = distributed.is_main()
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
    check_compiler(device, cfg.train.compile)  # train.compile on a CPU without a C++ compiler: refused now

    run = _set_up(cfg, spec, device, run_dir, data_cache)
    info = _begin(run, callbacks, overwrite)
    trained = train_loop(run, callbacks, progress)
    return _finish(run, info, trained, callbacks, t0)


def _set_up(cfg: RunConfig, spec: TaskSpec, device: torch.device, run_dir: Path,
            data_cache: str | Path | None) -> Run:
    """The data and the model, the optimizer and the controller, the evaluation at the start: every
    refusal of bad input happens here, before the run's folder is made."""
    quantized = quantized_load_kwargs(cfg.model.quantization, device, cfg.train.method)  # QLoRA; refusals: exit 2
    # read before the model (bad data fails first), unless a study's cache may hold the token rows
    task_rows = load_rows(cfg, spec) if data_cache is None else None
    model, tokenizer = _model(cfg, spec, device, quantized)
    encoded = encoded_splits(cfg, spec, tokenizer, data_cache, task_rows)
    train_loader, eval_loaders = _loaders(cfg, spec, tokenizer, encoded, model, device)
    majority = None if spec.is_regression or spec.is_instruction else convergence.majority_share(
        convergence.eval_labels(encoded[spec.eval_splits[0]], task_rows, spec.eval_splits[0]))  # of the split the metric is on
    data_counts = _truncation_counts({"train": train_loader, **eval_loaders}, cfg.task.max_length,
                                     distributed.is_main())
    micro_per_epoch = len(train_loader)
    steps_per_epoch = max(1, micro_per_epoch // cfg.train.grad_accum)
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))

    # -- optimizer and controller ----------------------------------------------------------
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, cfg.train.warmup_ratio))
    controller = _controller(cfg, spec, model, total, device, train_loader, eval_loaders)
    bf16_weights = cfg.model.dtype == "bfloat16"
    generation = generation_eval(cfg.eval, spec, tokenizer, cfg.seed, cfg.train.eval_batch_size)
    autocast = _autocast("bf16" if bf16_weights else cfg.model.precision, device)
    eval_ac = eval_autocast(cfg.eval, device, autocast)  # eval.autocast: bf16 on CUDA by default
    initial = initial_evaluation(model, eval_loaders, spec, device, eval_ac, generation) \
        if cfg.eval.at_start and distributed.is_main() else {}
    return Run(cfg=cfg, spec=spec, device=device, run_dir=run_dir, model=model, train_loader=train_loader,
               eval_loaders=eval_loaders, optimizer=optimizer, scheduler=scheduler, controller=controller,
               generation=generation, autocast=autocast, eval_autocast=eval_ac, total=total,
               steps_per_epoch=steps_per_epoch,
               majority=majority, data_counts=data_counts, initial=initial)


def _model(cfg: RunConfig, spec: TaskSpec, device: torch.device,
           quantized: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The model (adapters injected unless ``train.method: full``) on ``device``, and its tokenizer.
    ``quantized``: the 4-bit load's arguments (QLoRA, :mod:`dora_lab.run.quantization`), or empty."""
    bf16_weights = cfg.model.dtype == "bfloat16"  # frozen weights in bf16 (or 4 bits); what trains stays float32
    float32_trained = bf16_weights or bool(quantized)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, spec.num_labels, max_length=cfg.task.max_length,
                                                causal=spec.is_causal, trainable=cfg.model.trainable, **quantized,
                                                **({"dtype": torch.bfloat16} if bf16_weights else {}))
    seed_everything(cfg.seed)  # adapters' init must not depend on what loading consumed
    adapted = cfg.train.method == "adapter"
    if adapted:
        a = cfg.adapter
        try:
            inject_adapters(model, r0=a.r0, targets=a.targets, alpha=a.alpha, dropout=a.dropout, init=a.init,
                            trainable=cfg.model.trainable, dtype=torch.float32 if float32_trained else None)
        except ValueError as exc:  # no family default, or targets that match nothing: bad input, exit 2
            raise ConfigError(f"adapter.targets: {exc}") from None
    if float32_trained:
        _trainable_to_float32(model)
    if quantized:  # a 4-bit base is loaded onto its device (device_map), in one layout
        standard_layout(model)
    else:
        model.to(device)
    if cfg.train.gradient_checkpointing:
        # non-reentrant: works with a frozen embedding and under DDP (peft#1745's "marked ready twice")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _loaders(cfg: RunConfig, spec: TaskSpec, tokenizer: Any, encoded: dict[str, Any], model: torch.nn.Module,
             device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The training batches (this rank's share of every global batch) and each evaluation split's."""
    shards, shard = distributed.world_size(), distributed.rank()
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
    return train_loader, eval_loaders


def _controller(cfg: RunConfig, spec: TaskSpec, model: torch.nn.Module, total: int, device: torch.device,
                train_loader: Any, eval_loaders: dict[str, Any]) -> PruningController | None:
    """The pruning controller of an adapter run (None for ``train.method: full``), calibrated and given
    its validation batch where its allocation method asks for them."""
    if cfg.train.method != "adapter":
        return None
    bf16_weights = cfg.model.dtype == "bfloat16"
    controller = build_controller(cfg, model, total, agree=distributed.agree if distributed.world_size() > 1 else None)
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
    return controller


def _begin(run: Run, callbacks: Sequence[TrainCallback], overwrite: bool) -> RunInfo:
    """Make the run's folder (only now: bad data, a missing model or a schedule that cannot fit leave
    nothing behind), wrap the model for data-parallel training, tell the callbacks the run begins."""
    cfg, controller, model = run.cfg, run.controller, run.model
    shard = distributed.rank()
    if distributed.is_main():
        claim_run_dir(run.run_dir, overwrite)
        (run.run_dir / "config.yaml").write_text(cfg.to_yaml())
    run.ddp = for_training(distributed.wrap(model, run.device), cfg.train.compile)  # the model itself: one process, eager
    if shard > 0:
        torch.manual_seed(cfg.seed + 1_000_003 * shard)  # each rank its own dropout masks
    counts = count_parameters(model)
    info = RunInfo(
        config=cfg.resolved(), run_dir=run.run_dir, total_steps=run.total, steps_per_epoch=run.steps_per_epoch,
        trainable_parameters=counts.trainable, adapter_parameters=counts.adapter_active,
        budget_curve=controller.budget_curve() if controller else [],
        budget_unit=controller.unit if controller else "none", initial_metrics=run.initial,
    )
    for cb in callbacks:
        cb.on_train_begin(info)
    return info


def _finish(run: Run, info: RunInfo, trained: Trained, callbacks: Sequence[TrainCallback], t0: float) -> RunResult:
    """The run's result (the same on every rank) and, on rank 0, its files: metrics.json, allocation,
    scores, budget, the best evaluation's adapter; then the callbacks' end."""
    cfg, spec, controller, model, run_dir = run.cfg, run.spec, run.controller, run.model, run.run_dir
    sign = 1.0 if spec.greater_is_better else -1.0
    history = distributed.broadcast_object(trained.history)  # every rank returns rank 0's result
    best = (*distributed.broadcast_object(trained.best[:2]), trained.best[2])
    parallel = distributed.check_consistent(model, controller.allocation() if controller else {}, trained.rows)
    counts = count_parameters(model)
    result = RunResult(
        metric_name=spec.main_metric, best_metric=sign * float(best[0]), best_step=int(best[1]),
        final_metrics=history[-1], history=history,
        allocation=controller.allocation() if controller else {},
        trainable_parameters=info.trainable_parameters, adapter_parameters_final=counts.adapter_active,
        active_components_final=counts.active_components, steps=run.total, seconds=time.time() - t0,
        run_dir=run_dir, peak_memory_mb=trained.peak[0], peak_memory_source=trained.peak[1], data=run.data_counts,
        checks=convergence.checks(history, spec.main_metric, spec.greater_is_better, run.majority),
        initial_metrics=run.initial, environment=environment(run.device),
    )
    if not distributed.is_main():
        return result
    _write_outputs(run_dir, result, controller)
    if distributed.world_size() > 1:
        (run_dir / "distributed.json").write_text(json.dumps(parallel, indent=1))
    if cfg.train.method == "adapter" and cfg.train.save_adapter and best[2]:
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
    method = "" if cfg.method.name == DEFAULT_METHOD else f"{cfg.method.name}-"  # the default goes unsaid
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

