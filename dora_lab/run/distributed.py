"""Data-parallel runs: several processes, one mask (``torchrun`` + ``torch.distributed`` + DDP).

Everything a training loop needs to run under ``torchrun --nproc-per-node N`` lives here:

- :func:`init_from_env` joins the process group that ``torchrun`` describes in its environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); gloo on CPUs, NCCL
  when every local rank has a GPU of its own (gloo when ranks share one, which NCCL refuses).
  Without those variables it is a no-op and the run is one process, as before.
- :func:`agree` replaces each rank's pruning decision by rank 0's (a broadcast): gradients are
  averaged by DDP so scores agree anyway, but a float tie must not split the masks.
- :func:`wrap` puts DDP around the model; call it again after compaction has replaced the
  adapter's parameters (DDP holds the old ones in its buckets).
- :func:`check_consistent` compares masks, allocation and weights across ranks at the end of a
  run, so a desynchronised run fails loudly instead of saving rank 0's half of the truth.
- :func:`relaunch_command` is the ``torchrun`` command that ``train.processes: N`` runs (:func:`relaunch`
  runs it for ``python -m dora_lab.train``, passing SIGTERM on), and
  :func:`run_in_processes` runs a study trial that way while its callbacks (MLflow, the Optuna
  pruner) follow rank 0 live from the study's process.

A failure on any rank ends every rank: ``torchrun`` stops the group when one worker exits with
an error, and its error text is printed by the worker that raised.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .callbacks import RunResult, TrainCallback, replay_events
from .config import RunConfig

__all__ = [
    "agree",
    "all_mean",
    "broadcast_object",
    "check_consistent",
    "gpu_groups",
    "visible_gpus",
    "init_from_env",
    "is_main",
    "launched",
    "no_sync",
    "rank",
    "relaunch_command",
    "run_in_processes",
    "unwrap",
    "world_size",
    "wrap",
]

T = TypeVar("T")
_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or ``accelerate launch``) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that evaluates, saves and logs."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join ``torchrun``'s process group (once) and return this rank's device.

    ``device`` is the run's resolved device; a CUDA device becomes ``cuda:LOCAL_RANK`` (modulo the
    GPUs present, so two ranks may share one GPU).  Not launched by torchrun: returns ``device``.
    """
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        n_gpus = torch.cuda.device_count()
        device = torch.device("cuda", local % n_gpus)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        own_gpu = device.type == "cuda" and torch.cuda.device_count() >= local_world
        backend = os.environ.get("DORA_LAB_DIST_BACKEND") or ("nccl" if own_gpu else "gloo")
        dist.init_process_group(backend=backend)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; a no-op for one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def all_mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (the global batch's loss from the ranks' halves)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def agree(keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's keep-decision on every rank (one bool mask per layer, as ``controller.decide``)."""
    if not active():
        return dict(keep)
    names = list(keep)
    flat = torch.cat([keep[n].to(torch.uint8).cpu() for n in names])
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.broadcast(flat, src=0)
    flat = flat.cpu().bool()
    out, offset = {}, 0
    for n in names:
        size = keep[n].numel()
        out[n] = flat[offset : offset + size].to(keep[n].device)
        offset += size
    return out


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model`` (its unwrapped module when already wrapped); ``model`` for one process.

    Call again after compaction: the new, smaller parameters replace the old ones in the module,
    and a fresh DDP registers them (its constructor also checks that every rank has the same
    shapes and broadcasts rank 0's values, which are equal already).  Empty parameters (a layer
    pruned to rank 0) are left out.
    """
    module = unwrap(model)
    if not active():
        return module
    # a layer pruned to rank 0 has empty A, B, c that its forward skips: nothing to average, and
    # DDP would wait for their gradients forever ("parameters that were not used in producing loss")
    empty = [n for n, p in module.named_parameters() if p.requires_grad and p.numel() == 0]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, empty)
    ids = [device.index] if device.type == "cuda" else None
    # buffers (masks, original indices) are changed on every rank alike by the agreed decisions;
    # broadcasting them at every forward would only cost time (check_consistent compares them)
    new_name = "forward_sync_buffers" in _DDP_ARGS  # called broadcast_buffers before torch 2.13
    no_buffer_sync: dict[str, Any] = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, **no_buffer_sync)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync()`` when ``skip`` (a micro-batch before the last of a gradient accumulation):
    the gradients accumulate locally and are averaged once, in the last micro-batch's backward."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_consistent(model: nn.Module, allocation: Mapping[str, int], rows: int) -> dict[str, Any]:
    """Compare the allocation and trainable weights across ranks; raise if they differ.

    Returns ``{"world_size", "allocation_identical", "max_weight_diff", "rows_per_rank"}``: the
    largest absolute difference of any trainable weight between any rank and rank 0 (0.0 for one
    process) and the training rows each rank saw (``rows`` is this rank's count).
    """
    if not active():
        return {"world_size": 1, "allocation_identical": True, "max_weight_diff": 0.0, "rows_per_rank": [rows]}
    mine = {"allocation": dict(allocation), "rows": rows,
            "index": {n: b.tolist() for n, b in unwrap(model).named_buffers() if n.endswith(".index")}}
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    same = all({**g, "rows": 0} == {**gathered[0], "rows": 0} for g in gathered)
    if not same:
        raise RuntimeError(f"ranks disagree on the final masks: {[g['allocation'] for g in gathered]}")
    params = [p.detach() for p in unwrap(model).parameters() if p.requires_grad]
    flat = torch.cat([p.double().flatten() for p in params]) if params else torch.zeros(1, dtype=torch.float64)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = torch.tensor([float((flat - reference).abs().max())], dtype=torch.float64, device=flat.device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    max_diff = float(diff.item())
    if max_diff > 1e-4:
        raise RuntimeError(f"ranks' adapter weights differ by up to {max_diff:.3g} after training")
    return {"world_size": world_size(), "allocation_identical": True, "max_weight_diff": max_diff,
            "rows_per_rank": [g["rows"] for g in gathered]}


def relaunch_command(processes: int, module: str, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGV``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", module, *argv]


def relaunch(processes: int, module: str, argv: Sequence[str]) -> int:
    """Run this command again under ``torchrun`` (:func:`relaunch_command`) and wait; its exit code.
    A SIGTERM here (:func:`~dora_lab.run.cli.stop_on_signals`) is passed on to ``torchrun``, which stops
    its ranks, so that none outlives this process (Ctrl-C needs no passing on: the terminal sends
    SIGINT to every process of the group)."""
    from .cli import Terminated, stop_code

    proc = subprocess.Popen(relaunch_command(processes, module, argv))
    try:
        return proc.wait()
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return stop_code(exc)


def run_in_processes(cfg: RunConfig, run_dir: Path, callbacks: Sequence[TrainCallback] = (),
                     poll: float = 0.5) -> RunResult:
    """Run ``cfg`` as ``torchrun --nproc-per-node cfg.train.processes`` and follow it from here.

    Rank 0's hooks reach ``callbacks`` as they happen (through ``run_dir/events.jsonl``); a hook
    that raises (``TrialPruned``) stops every process and raises here.  The processes' output goes
    to ``run_dir/processes.log``; a failure on any rank raises ``RuntimeError`` with its message.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config, events, log = run_dir / "trial_config.yaml", run_dir / "events.jsonl", run_dir / "processes.log"
    config.write_text(cfg.to_yaml())
    events.write_text("")
    argv = [str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "DORA_LAB_EVENTS": str(events)}
    result = None
    with log.open("w") as out, events.open() as stream:
        # own session: stopping the trial stops torchrun and every rank it started, and nothing else
        proc = subprocess.Popen(relaunch_command(cfg.train.processes, "dora_lab.train", argv), env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                result = replay_events(stream, callbacks) or result
                time.sleep(poll)
            result = replay_events(stream, callbacks) or result
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"the {cfg.train.processes}-process run failed (exit {proc.returncode}): "
                           f"{_first_error(log.read_text())} (the whole output: {log})")
    return result


def _first_error(output: str) -> str:
    """The exception line of the rank that failed first (torchrun names it the root cause)."""
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", output, re.S)
    ranks = [root.group(1)] if root else [r"\d+"]
    for r in ranks:
        found = re.findall(rf"^\[rank{r}\]: (\w+(?:Error|Exception|Interrupt)\b.*)$", output, re.M)
        if found:
            return found[-1]
    # a rank whose train CLI caught the error printed it as one line (dora_lab.run.cli.failed): the first
    # such line is the first rank that failed
    caught = re.search(r"error: the run failed during training: (.*)$", output, re.M)
    if caught:
        return caught.group(1)
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def gpu_groups(gpus: Sequence[str], workers: int, per_trial: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``workers`` study workers on one machine whose trials use
    ``per_trial`` processes: disjoint groups of ``per_trial`` of ``gpus`` when there are enough,
    else ``None`` for every worker (they share the GPUs, as without this)."""
    if len(gpus) < 2 or len(gpus) < workers * per_trial:
        return [None] * workers
    return [",".join(gpus[i * per_trial : (i + 1) * per_trial]) for i in range(workers)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [g for g in pinned.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
