"""Speed and memory of one training step: dora_lab against the frozen-model floor and PEFT.

    python benchmarks/bench_speed.py [--quick] [--out benchmarks/results] [--device cpu|cuda]

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

On a GPU (``--device cuda``; the results are then ``bench_speed_cuda[_quick]``, with the GPU named):
the models and the batch live on it, ``torch.cuda.synchronize()`` comes before every timer read (each
phase of a step is timed after its kernels finish, not after their launch), and the memory column is
``torch.cuda.max_memory_allocated`` over one step, its counter reset before each configuration, less
what was allocated before the step, plus the resting state: the same definition as on the CPU, read
from CUDA's caching allocator, which sees every tensor (``speed/timing.cuda_step_memory``).  The
torch-dropout variant is left out there (it differs from dora_r3 on the CPU only).  The magnitude
scorer's table is timed on the GPU too.  Asking for cuda where torch sees no GPU is refused (exit 2)
before anything is built.

The magnitude scorer is also timed on its own against the paper's naive form, which materialises
each component's ``d_out x d_in`` update, over several start ranks: the closed form costs
``O(r0^2 (d_in + d_out))``, the naive one ``O(r0 d_in d_out)``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# OpenMP threads that wait for work by sleeping, not spinning, unless the caller chose otherwise.
# Set before torch starts its OpenMP runtime.  With spinning (the default) any other busy process
# on the same cores turns each parallel region into a convoy: on this project's 2-core machine with
# one other training run, a MiniLM floor step took 3.5 s instead of 0.38 s and the adapter's ratio
# to it went from 1.18 to 2.4, because the adapter adds many small parallel regions.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Run as a script from anywhere: import the checkout's dora_lab and this folder's speed package.
for _folder in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from speed.configs import build_configs, drive_to_final  # noqa: E402
from speed.device import cuda_refusal, gpu_info  # noqa: E402
from speed.report import markdown, targets  # noqa: E402
from speed.scaling import magnitude_scaling  # noqa: E402
from speed.setup import REPO, ModelSpec, block_shapes, load_batch, machine_info, model_specs  # noqa: E402
from speed.timing import config_result, scorer_update_ms, step_memory, time_interleaved, warm_up  # noqa: E402


# -- main ----------------------------------------------------------------------------------------------------
def run_model(spec: ModelSpec, batch: dict[str, torch.Tensor], quick: bool, deadline: float,
              device: torch.device) -> dict[str, Any]:
    """Build, drive, time and measure every configuration of one model on ``device`` (where ``batch``
    is), finishing by ``deadline`` (a ``time.perf_counter()`` value) as far as the plan's minimum
    rounds allow."""
    t0 = time.perf_counter()
    base = spec.build().to(device)
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
        mag = magnitude_scaling(shapes, [1, 2, 4, 8], naive_max_rank=8, min_seconds=0.01, device=device)
    else:
        naive_max = 32 if max(d for s in shapes for d in s) <= 2048 else 16  # the naive form is slow
        mag = magnitude_scaling(shapes, [2, 4, 8, 16, 32, 64, 128, 256], naive_max_rank=naive_max, min_seconds=0.2,
                                device=device)
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the models and the batch live (cuda: results bench_speed_cuda[_quick])")
    args = parser.parse_args(argv)
    if (why := cuda_refusal(args.device)) is not None:
        from dora_lab.run.cli import refuse

        raise SystemExit(refuse(why))
    device = torch.device(args.device)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)  # a tiny model is fastest on one thread

    start = time.perf_counter()
    machine = machine_info()
    batch, batch_info = load_batch()
    batch = {k: v.to(device) for k, v in batch.items()}
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
        models.append(run_model(spec, batch, args.quick, now + (deadline - now) / (len(specs) - i), device))
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "device": args.device, **({"gpu": gpu_info()} if device.type == "cuda" else {}),
        "machine": machine, "batch": batch_info, "models": models,
        "targets": [t for m in models for t in targets(m)],
        "runtime_s": time.perf_counter() - start, "load_average_at_end": list(os.getloadavg()),
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("bench_speed_quick" if args.quick else "bench_speed") + ("_cuda" if device.type == "cuda" else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
