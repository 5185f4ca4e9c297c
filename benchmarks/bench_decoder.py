"""Training-step time and memory of dora_lab against PEFT LoRA on a decoder LLM, in one process.

    python benchmarks/bench_decoder.py [--device cpu|cuda] [--dtype float32|bfloat16]
        [--model smollm2-shape|tiny|PATH] [--layers N] [--batch 4] [--seq 256] [--rank 8]
        [--final-rank 4] [--rounds 6] [--block 2] [--out results.json]

The model: ``smollm2-shape`` is a ``LlamaConfig`` with SmolLM2-135M's dimensions (hidden 576, 30
layers, 9 heads, 3 key/value heads, MLP 1536, vocabulary 49152, tied embeddings) and random weights
(speed does not depend on the values); ``--layers`` keeps only the first N layers (each layer costs
the same, so ratios hold; for a slow CPU); ``tiny`` is a 2-layer, 64-wide Llama (for the tests); a
PATH is any local causal-LM folder.  Every configuration adapts the same seven projections of every
layer (q k v o gate up down), alpha 8, dropout 0.1, and trains on the same batch of random token ids
(``--batch`` x ``--seq``, labels = the ids: the causal-LM loss).  The frozen weights are built once
and shared by all configurations (never written).  ``--dtype bfloat16`` stores the frozen weights
in bf16, keeps every adapter's weights in float32 (PEFT's default upcast; dora_lab's
``model.dtype: bfloat16``) and runs each step under bf16 autocast, as ``dora_lab.train`` does.

The configurations:

    peft_lora_r{R}      PEFT LoRA at rank R (``--rank``)
    dora_r{R}           dora_lab at r0 = R before pruning, no controller (the adapter alone)
    dora_r{R}_scoring   dora_r{R} plus a PruningController (magnitude scorer) inside its decay window:
                        the scorer is updated every step, no prune happens in the timed steps
    peft_lora_r{F}      PEFT LoRA at rank F (``--final-rank``)
    dora_final          dora_lab R -> F (average), the controller driven through five prune steps to
                        its frozen mask: A, B, c and AdamW's state compacted to the kept components

A step is forward with the loss, backward, ``AdamW.step()``, ``controller.step(optimizer)`` where
there is a controller, ``zero_grad()``.  The configurations are timed in interleaved round-robin
blocks (``--block`` steps each, ``--rounds`` rounds, the order reversed every other round), so any
load from other processes hits all alike; results are medians and ratios within this one run.  On
CUDA each step ends with ``torch.cuda.synchronize()`` (outside what is measured for syncs).

Also measured:

- the controller's share of a step: ``dora_r{R}_scoring`` against ``dora_r{R}`` (the step-time
  difference), and the time of ``controller.step()`` itself (host wall time; on CUDA also the GPU
  time between two CUDA events around it);
- on CUDA, host-device synchronisations per step and per phase: every timed step runs under
  ``torch.cuda.set_sync_debug_mode("warn")`` and the warnings torch issues for synchronising calls
  (``.item()``, ``nonzero``, blocking copies) are counted.  Prune steps are not timed;
- peak memory of one step per configuration: on CUDA ``max_memory_allocated`` above what was
  allocated before the step; on a CPU the running sum of torch's allocator events under
  ``torch.profiler`` (``profile_memory=True``).  The configuration's resting memory (its trainable
  parameters, their gradients' and AdamW's state) is added from the tensors; the shared frozen
  weights are reported once.

Imports only torch, transformers, peft and dora_lab's core (no pydantic, Optuna, MLflow, datasets),
so it runs on a bare GPU machine from a checkout.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_speed.py: shared cores, no spinning

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's dora_lab
    sys.path.insert(0, str(REPO))

from dora_lab import (  # noqa: E402
    PruningController,
    adapter_layers,
    count_parameters,
    inject_adapters,
    make_scorer,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALPHA, DROPOUT, LR, WEIGHT_DECAY = 8.0, 0.1, 1e-4, 0.01
PHASES = ("forward", "backward", "optimizer", "controller", "zero_grad")
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                     tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
PRUNE_STEPS = 5  # dora_final: a soft prune at steps 1..4, the final (freeze + compact) at step 5


# -- the model --------------------------------------------------------------------------------------
def build_base(spec: str, layers: int | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if spec in ("smollm2-shape", "tiny"):
        kw: dict[str, Any] = dict(SMOLLM2_SHAPE) if spec == "smollm2-shape" else dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=512)
        if layers:
            kw["num_hidden_layers"] = layers
        with torch.device(device):
            model: nn.Module = LlamaForCausalLM(LlamaConfig(**kw)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device)
        if layers:
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose parameters and buffers are the same tensors (frozen, never written)."""
    memo: dict[int, Any] = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


# -- one configuration ------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    model: nn.Module
    controller: PruningController | None = None
    info: dict[str, Any] = field(default_factory=dict)
    times: list[list[float]] = field(default_factory=list)  # per timed step: seconds per phase
    syncs: list[dict[str, int]] = field(default_factory=list)  # per timed step (CUDA): syncs per phase
    controller_gpu_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.info["trainable_parameters"] = sum(p.numel() for p in self.params)

    def resting_bytes(self) -> int:
        """Trainable parameters, their gradients and AdamW's state (the configuration's own memory)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = sum(v.numel() * v.element_size() for p in params for v in self.optimizer.state.get(p, {}).values()
                    if torch.is_tensor(v))
        return sum(2 * p.numel() * p.element_size() for p in params) + state


class Bench:
    def __init__(self, device: torch.device, dtype: torch.dtype, batch: dict[str, torch.Tensor]) -> None:
        self.device, self.dtype, self.batch = device, dtype, batch
        self.cuda = device.type == "cuda"

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def step(self, cfg: Config, record: bool = False) -> None:
        """One training step; with ``record`` its phase times (and on CUDA its syncs) are kept."""
        marks = [time.perf_counter()]
        syncs: dict[str, int] = {}
        events = None
        with self.autocast(), self._syncs(syncs, "forward", record):
            loss = cfg.model(**self.batch).loss
        marks.append(time.perf_counter())
        with self._syncs(syncs, "backward", record):
            loss.backward()
        marks.append(time.perf_counter())
        with self._syncs(syncs, "optimizer", record):
            cfg.optimizer.step()
        marks.append(time.perf_counter())
        if cfg.controller is not None:
            if self.cuda and record:
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            with self._syncs(syncs, "controller", record):
                cfg.controller.step(cfg.optimizer)
            if events is not None:
                events[1].record()
        marks.append(time.perf_counter())
        with self._syncs(syncs, "zero_grad", record):
            cfg.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        marks.append(time.perf_counter())
        if record:
            cfg.times.append([b - a for a, b in zip(marks, marks[1:], strict=False)])
            if self.cuda:
                cfg.syncs.append(syncs)
            if events is not None:
                cfg.controller_gpu_ms.append(events[0].elapsed_time(events[1]))

    def _syncs(self, counts: dict[str, int], phase: str, record: bool) -> Any:
        bench = self

        class Count:
            def __enter__(self) -> None:
                if bench.cuda and record:
                    self.caught = warnings.catch_warnings(record=True)
                    self.log = self.caught.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")

            def __exit__(self, *exc: object) -> None:
                if bench.cuda and record:
                    torch.cuda.set_sync_debug_mode(0)
                    self.caught.__exit__(None, None, None)
                    counts[phase] = sum("synchroniz" in str(w.message) for w in self.log)

        return Count()

    def memory(self, cfg: Config) -> dict[str, float] | None:
        """Peak MiB of one step above the resting state, plus the configuration's resting MiB."""
        gc.collect()
        mib = 2.0**20
        if self.cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(cfg)
            peak = torch.cuda.max_memory_allocated(self.device) - before
        else:
            from torch.profiler import ProfilerActivity, profile

            try:
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    self.step(cfg)
                evs = [e for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
                       if e.name() == "[memory]" and "CPU" in str(e.device_type())]
            except Exception as err:  # the profiler's internals move between torch versions
                print(f"  memory of {cfg.name}: not measured ({err})", file=sys.stderr)
                return None
            current = peak = 0
            for e in sorted(evs, key=lambda e: e.start_ns()):
                current += e.nbytes()
                peak = max(peak, current)
        resting = cfg.resting_bytes()
        return {"step_peak_mib": peak / mib, "resting_mib": resting / mib, "peak_mib": (peak + resting) / mib}


# -- building the configurations --------------------------------------------------------------------
def peft_lora(base: nn.Module, rank: int) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(shared_copy(base), config)


def dora(base: nn.Module, rank: int) -> nn.Module:
    model = shared_copy(base)
    inject_adapters(model, r0=rank, targets=TARGETS, alpha=ALPHA, dropout=DROPOUT, trainable=(),
                    dtype=torch.float32)  # float32 adapters, as PEFT's upcast (a no-op in float32)
    return model


def build_configs(base: nn.Module, rank: int, final_rank: float, bench: Bench) -> list[Config]:
    torch.manual_seed(1)
    scoring = dora(base, rank)
    # decay window from step 1 to the end of a long run: a prune at step 1 (untimed), then none
    ctl_scoring = PruningController(scoring, make_scorer("magnitude"), "dora", 10**6, target_rank=final_rank,
                                    warmup=1, final=1, interval=10**6)
    final = dora(base, rank)
    ctl_final = PruningController(final, make_scorer("magnitude"), "dora", 10**6, target_rank=final_rank,
                                  warmup=1, final=10**6 - PRUNE_STEPS, interval=1)
    configs = [
        Config(f"peft_lora_r{rank}", peft_lora(base, rank)),
        Config(f"dora_r{rank}", dora(base, rank)),
        Config(f"dora_r{rank}_scoring", scoring, ctl_scoring),
        Config(f"peft_lora_r{int(final_rank)}", peft_lora(base, int(final_rank))),
        Config("dora_final", final, ctl_final),
    ]
    for cfg in configs:  # drive the controllers past their prune steps (a prune step may sync)
        ctl = cfg.controller
        while ctl is not None and ctl.t <= (PRUNE_STEPS if cfg.name == "dora_final" else 1):
            bench.step(cfg)
    assert ctl_final.frozen and not ctl_scoring.frozen
    counts = count_parameters(final)
    configs[-1].info.update(active_components=counts.active_components, average_rank=counts.average_rank,
                            allocation={n: la.rank for n, la in adapter_layers(final).items()})
    for cfg in configs:
        cfg.info["trainable_parameters"] = sum(p.numel() for p in cfg.model.parameters() if p.requires_grad)
    return configs


# -- timing and the report --------------------------------------------------------------------------
def time_interleaved(configs: list[Config], bench: Bench, rounds: int, block: int, warmup: int) -> None:
    for cfg in configs:
        for _ in range(warmup):
            bench.step(cfg)
    for r in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for cfg in configs if r % 2 == 0 else list(reversed(configs)):
                for _ in range(block):
                    bench.step(cfg, record=True)
        finally:
            gc.enable()


def summary(cfg: Config) -> dict[str, Any]:
    totals = sorted(1e3 * sum(t) for t in cfg.times)
    out: dict[str, Any] = {
        "median_ms": statistics.median(totals), "p10_ms": totals[len(totals) // 10],
        "p90_ms": totals[-1 - len(totals) // 10], "n": len(totals),
        "phases_median_ms": {ph: statistics.median(1e3 * t[i] for t in cfg.times) for i, ph in enumerate(PHASES)},
        "step_ms": [1e3 * sum(t) for t in cfg.times], **cfg.info,
    }
    if cfg.syncs:
        out["syncs_per_step"] = statistics.mean(sum(s.values()) for s in cfg.syncs)
        out["syncs_by_phase_max"] = {ph: max(s.get(ph, 0) for s in cfg.syncs) for ph in PHASES}
    if cfg.controller_gpu_ms:
        out["controller_gpu_ms_median"] = statistics.median(cfg.controller_gpu_ms)
    return out


def paired_ratio(a: dict[str, Any], b: dict[str, Any], block: int) -> float:
    """Median over rounds of (a's mean step in round k) / (b's mean step in round k): each round runs
    every configuration back to back, so a pair shares the machine's load of that moment (robust
    where other processes come and go; the plain ratio of medians is reported beside it)."""
    def rounds(c: dict[str, Any]) -> list[float]:
        ms = c["step_ms"]
        return [statistics.fmean(ms[i:i + block]) for i in range(0, len(ms), block)]

    return statistics.median(x / y for x, y in zip(rounds(a), rounds(b), strict=True))


def headline(results: dict[str, dict[str, Any]], rank: int, final_rank: int, block: int) -> dict[str, Any]:
    med = {n: r["median_ms"] for n, r in results.items()}
    scoring = results[f"dora_r{rank}_scoring"]
    pairs = {"before_pruning": (f"dora_r{rank}", f"peft_lora_r{rank}"),
             "scoring_before_pruning": (f"dora_r{rank}_scoring", f"peft_lora_r{rank}"),
             "after_compaction": ("dora_final", f"peft_lora_r{final_rank}")}
    head: dict[str, Any] = {
        "time_ratio_dora_to_peft_before_pruning": med[f"dora_r{rank}"] / med[f"peft_lora_r{rank}"],
        "time_ratio_dora_scoring_to_peft_before_pruning": med[f"dora_r{rank}_scoring"] / med[f"peft_lora_r{rank}"],
        "time_ratio_dora_to_peft_after_compaction": med["dora_final"] / med[f"peft_lora_r{final_rank}"],
        **{f"paired_time_ratio_{k}": paired_ratio(results[a], results[b], block) for k, (a, b) in pairs.items()},
        "controller_share_of_step": (med[f"dora_r{rank}_scoring"] - med[f"dora_r{rank}"]) / med[f"dora_r{rank}_scoring"],
        "paired_controller_share_of_step": 1 - paired_ratio(results[f"dora_r{rank}"], scoring, block),
        "controller_step_host_ms": scoring["phases_median_ms"]["controller"],
        "controller_step_host_share": scoring["phases_median_ms"]["controller"] / scoring["median_ms"],
    }
    if "controller_gpu_ms_median" in scoring:
        head["controller_step_gpu_ms"] = scoring["controller_gpu_ms_median"]
    mem = {n: r.get("memory") for n, r in results.items()}
    if all(m is not None for m in mem.values()):
        head["peak_memory_ratio_dora_to_peft_before_pruning"] = (
            mem[f"dora_r{rank}"]["peak_mib"] / mem[f"peft_lora_r{rank}"]["peak_mib"])  # type: ignore[index]
        head["peak_memory_ratio_dora_to_peft_after_compaction"] = (
            mem["dora_final"]["peak_mib"] / mem[f"peft_lora_r{final_rank}"]["peak_mib"])  # type: ignore[index]
    if all("syncs_per_step" in r for r in results.values()):
        head["syncs_per_step"] = {n: r["syncs_per_step"] for n, r in results.items()}
    return head


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--model", default="smollm2-shape", help="smollm2-shape, tiny, or a local model folder")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--final-rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.final_rank < args.rank:
        parser.error(f"--final-rank must be between 0 and --rank ({args.rank}), got {args.final_rank}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    t0 = time.perf_counter()
    base = build_base(args.model, args.layers, dtype, device)
    vocab = int(base.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    bench = Bench(device, dtype, {"input_ids": ids, "labels": ids})
    configs = build_configs(base, args.rank, float(args.final_rank), bench)
    print(f"built {len(configs)} configurations in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    time_interleaved(configs, bench, args.rounds, args.block, args.warmup)
    results = {cfg.name: summary(cfg) for cfg in configs}
    for cfg in configs:
        results[cfg.name]["memory"] = bench.memory(cfg)
    frozen = {id(p): p for p in base.parameters()}
    out: dict[str, Any] = {
        "args": vars(args), "machine": machine(device),
        "model": {"spec": args.model, "layers": int(base.config.num_hidden_layers),
                  "hidden": int(base.config.hidden_size), "vocab": vocab,
                  "frozen_parameters": sum(p.numel() for p in frozen.values()),
                  "frozen_mib": sum(p.numel() * p.element_size() for p in frozen.values()) / 2**20},
        "headline": headline(results, args.rank, args.final_rank, args.block),
        "configurations": results, "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out["headline"], indent=1))
    for name, r in results.items():
        mem = r["memory"]["peak_mib"] if r.get("memory") else float("nan")
        print(f"{name:22s} median {r['median_ms']:9.1f} ms  p10 {r['p10_ms']:9.1f}  p90 {r['p90_ms']:9.1f}  "
              f"peak {mem:8.1f} MiB  trainable {r['trainable_parameters']}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

