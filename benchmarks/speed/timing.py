"""Measuring the configurations: untimed warm-up steps, interleaved round-robin timing within a
time budget, the scorer's ``update`` alone, one step's peak memory (torch's allocator events from
the profiler plus ``tracemalloc``), and the per-configuration summary (median, spread, phases,
ratios to the floor and to PEFT LoRA at the comparable rank, the scorer's overhead).
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import torch

from dora_lab import PruningController

from .configs import PHASES, Config
from .device import synchronizer
from .setup import Plan


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
        cfg.sync()
        t0 = time.perf_counter()
        controller.scorer.update(controller.layers)
        cfg.sync()
        times.append(time.perf_counter() - t0)
    cfg.optimizer.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(times)


def step_memory(cfg: Config, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Peak bytes above the resting state during one step: torch's CPU allocator events (profiler)
    plus the peak of what ``tracemalloc`` sees (numpy's buffers and Python objects; both peaks are
    added, an upper bound that is tight when they peak together, at the end of the forward pass).
    On a GPU: :func:`cuda_step_memory`."""
    from torch.profiler import ProfilerActivity, profile

    if cfg.device.type == "cuda":
        return cuda_step_memory(cfg, batch)

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


def cuda_step_memory(cfg: Config, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """One step's peak on the GPU: ``torch.cuda.max_memory_allocated`` over the step, its counter reset
    just before it (so each configuration has its own), less what was allocated before the step (every
    configuration's frozen weights, parameters and optimizer state live at once in this process), plus
    this configuration's resting bytes: the CPU figure's definition.  The allocator's whole peak is kept
    as ``cuda_max_allocated_mib``."""
    gc.collect()
    synchronizer(cfg.device)()
    torch.cuda.reset_peak_memory_stats(cfg.device)
    before = torch.cuda.memory_allocated(cfg.device)
    cfg.step(batch)
    peak = torch.cuda.max_memory_allocated(cfg.device)
    resting, mib = cfg.resting_bytes(), 2.0**20
    return {"step_peak_torch_mib": (peak - before) / mib, "step_peak_numpy_python_mib": 0.0,
            "resting_mib": resting / mib, "peak_mib": (peak - before + resting) / mib,
            "cuda_max_allocated_mib": peak / mib}


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
