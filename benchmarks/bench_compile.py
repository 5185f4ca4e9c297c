"""``train.compile`` on this machine: compile warm-up and step time against the eager step (issue 27).

    python benchmarks/bench_compile.py [--steps 12] [--models tiny minilm] [--out benchmarks/results]

For each model the training step of ``configs/cola.yaml`` (dora_lab adapter r0 3 on the six linears of
every layer, dropout 0.1, AdamW, clipping at 1.0, DEM regulariser, magnitude controller before pruning
starts; one fixed batch: the first 32 CoLA training sentences padded to the longest) runs eager, then
with the model under ``torch.compile`` (inductor, its on-disk caches off: a cold start, what a trial
pays the first time).  Reported per model, on one thread: the eager step's and the compiled step's
median wall and CPU seconds, the compiled first step (the warm-up: tracing and building the C++
kernels), their ratios, the steps after which compiling has paid for its warm-up (none when the
compiled step is not faster), and the compiler's graph and graph-break counts.  After the warm-up
the eager and compiled steps take turns, so other users' load hits both alike (a shared machine).  One fixed batch
shape: a real run also recompiles once when the padded length first changes and when the mask is
frozen (tests/test_compile.py), so this is the least warm-up a run pays.  ``tiny`` is tests/tiny.py's
2-layer, 32-wide BERT; ``minilm`` the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # a cold start, before torch loads inductor
HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402
from speed.setup import bert_from_config, cola_step, load_batch, machine_info, pretrained_minilm  # noqa: E402

from dora_lab.run.compile import compile_counts, for_training  # noqa: E402

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny": lambda: bert_from_config(hidden=32, layers=2, heads=2, intermediate=64),
    "minilm": pretrained_minilm,
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_step(name: str, compiled: bool, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step of the cola recipe on a fresh copy of model ``name`` (eager or compiled)."""
    torch.manual_seed(0)
    return cola_step(MODELS[name](), batch, lambda model: for_training(model, compiled))


def timed(step: Callable[[], None], n: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(n):
        w0, c0 = time.perf_counter(), _cpu()
        step()
        cpu.append(_cpu() - c0)
        wall.append(time.perf_counter() - w0)
    return wall, cpu


def run_model(name: str, steps: int, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Warm-up of the compiled step, then ``steps`` rounds of one eager and one compiled step taking
    turns (the order reversed every other round), so a change in other users' load hits both alike."""
    torch._dynamo.reset()
    compiled = make_step(name, True, batch)
    (warm_wall,), (warm_cpu,) = timed(compiled, 1)
    timed(compiled, 1)  # the second call may still settle (guards)
    eager = make_step(name, False, batch)
    timed(eager, 2)  # allocator and MKL warm-up
    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps):
        for is_compiled in ((False, True) if i % 2 == 0 else (True, False)):
            (w,), (c,) = timed(compiled if is_compiled else eager, 1)
            walls[is_compiled].append(w)
            cpus[is_compiled].append(c)
    counts = compile_counts()
    e, c = statistics.median(walls[False]), statistics.median(walls[True])
    return {"model": name, "eager_step_s": e, "eager_step_cpu_s": statistics.median(cpus[False]),
            "compiled_step_s": c, "compiled_step_cpu_s": statistics.median(cpus[True]),
            "warmup_s": warm_wall, "warmup_cpu_s": warm_cpu, "compiled_over_eager": c / e,
            "warmup_over_eager_step": warm_wall / e,
            "break_even_steps": warm_wall / (e - c) if c < e else None, **counts}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# torch.compile on the CPU: warm-up and step time against eager", "",
        f"{m.get('cpu_model')}, {m.get('usable_cpus')} usable CPU(s), torch {torch.__version__}, one thread; "
        f"load average at start {result['load'][0]:.2f}, at end {result['load'][1]:.2f} (a shared machine). "
        f"Batch {result['batch']['shape']}; {result['steps']} timed steps each; inductor caches off (cold start). "
        f"Run took {result['seconds']:.0f} s (`{result['command']}`).", "",
        "| model | eager s/step | compiled s/step | compiled/eager | CPU s/step eager | CPU s/step compiled "
        "| warm-up s | warm-up / eager step | break-even steps | graphs | graph breaks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["models"]:
        even = "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"
        lines.append(f"| {r['model']} | {r['eager_step_s']:.4f} | {r['compiled_step_s']:.4f} | "
                     f"{r['compiled_over_eager']:.2f} | {r['eager_step_cpu_s']:.4f} | {r['compiled_step_cpu_s']:.4f} | "
                     f"{r['warmup_s']:.1f} | {r['warmup_over_eager_step']:.0f} | "
                     f"{even} | {r['graphs']} | {r['breaks']} |")
    lines += ["", "Wall times are medians of steps taking turns; CPU s/step is this process's (all its threads); the "
              "warm-up's CPU time in this process leaves out the C++ compiler's child processes."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()[0]
    batch, batch_info = load_batch()
    models = [run_model(name, args.steps, batch) for name in args.models]
    result = {"command": " ".join(["python benchmarks/bench_compile.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "batch": batch_info, "steps": args.steps, "models": models,
              "load": [load0, os.getloadavg()[0]], "seconds": time.time() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_compile_cpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench_compile_cpu.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
