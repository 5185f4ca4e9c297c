"""The allocation-methods ablation on a decoder LLM: every method, AdaLoRA and plain LoRA on
SmolLM2-135M-Instruct asked CoLA as a prompt (``configs/smollm2_cola.yaml``), at the same adapter
parameters (610,980: LoRA at rank 2 on the 210 matrices), seeds 0, 1, 2, on one GPU.

    python scripts/decoder_methods_ablation.py --out docs/methods_decoder/results.json \\
        [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--data ../shared/data/glue/cola] [--steps 200] \\
        [--parallel 9] [--runs /tmp/decoder_runs] [--arms dora lora ...] [--set key=value ...]

Each arm is ``configs/smollm2_cola.yaml`` with the GPU settings below and its own overrides (the
MiniLM ablation's: ``studies/ablation_methods*.yaml``); the runs are ``python -m dora_lab.train``
processes, ``--parallel`` at a time on the one GPU (a 135M model leaves it mostly idle: nine at a
time took 7.5 minutes for the 27 runs on an H200).  No Optuna or MLflow: the GPU machine this was
measured on had neither, so this script reads each run folder's metrics.json and writes one JSON
with every run's metrics, allocation and budget curve, and prints the table (mean, sd, paired
difference to LoRA by seed).  ``--set`` adds overrides to every run (e.g. ``model.device=cpu``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
GPU = ["train.batch_size=32", "task.max_eval_samples=null", "model.precision=bf16", "schedule.interval=5",
       "model.device=cuda", "train.eval_batch_size=128"]
METHODS = ("dora", "sora", "increlora", "dylora", "eva", "alora", "fisher")
ARMS: dict[str, list[str]] = {m: [f"method.name={m}"] for m in METHODS}
ARMS["adalora"] = ["scorer.name=smoothed_uncertainty", "scorer.params={}", "schedule.name=adalora",
                   "regularizer.name=orthogonal", "regularizer.weight=0.1", "adapter.init=adalora"]
ARMS["lora"] = ["schedule.name=constant", "adapter.r0=2", "budget.target_params=null", "budget.target_rank=2.0"]


def overrides(args: argparse.Namespace, arm: str, seed: int) -> list[str]:
    return [f"model.name={args.model}", f"task.data_dir={args.data}", f"train.max_steps={args.steps}",
            f"train.eval_every={args.steps}", *GPU, *args.set, *ARMS[arm], f"seed={seed}"]


def run_one(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    run = args.runs / f"{arm}-s{seed}"
    cmd = [sys.executable, "-m", "dora_lab.train", str(REPO / "configs" / "smollm2_cola.yaml"), "--run-dir", str(run),
           "--overwrite"]
    for o in overrides(args, arm, seed):
        cmd += ["--set", o]
    t0 = time.time()
    with open(args.runs / f"{arm}-s{seed}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    out: dict[str, Any] = {"arm": arm, "seed": seed, "rc": rc, "seconds": time.time() - t0}
    for name in ("metrics.json", "allocation.json", "budget.json"):
        if (run / name).is_file():
            out[name.removesuffix(".json")] = json.loads((run / name).read_text())
    return out


def table(results: list[dict[str, Any]]) -> list[str]:
    done = [r for r in results if r["rc"] == 0 and "metrics" in r]
    mcc = {(r["arm"], r["seed"]): r["metrics"]["final"]["matthews_correlation"] for r in done}
    lines = ["| arm | MCC per seed | mean ± sd | minus LoRA, paired (mean, sd) | adapter parameters |",
             "| --- | --- | --- | --- | --- |"]
    arms = sorted({a for a, _ in mcc}, key=lambda a: -statistics.mean(v for (b, _), v in mcc.items() if b == a))
    for arm in arms:
        seeds = sorted(s for a, s in mcc if a == arm)
        vals = [mcc[(arm, s)] for s in seeds]
        diffs = [mcc[(arm, s)] - mcc[("lora", s)] for s in seeds if ("lora", s) in mcc]
        params = next(r["metrics"]["adapter_parameters_final"] for r in done if r["arm"] == arm)
        sd = f"{statistics.stdev(vals):.3f}" if len(vals) > 1 else "-"
        dsd = f"{statistics.stdev(diffs):.3f}" if len(diffs) > 1 else "-"
        lines.append(f"| {arm} | {' '.join(f'{v:.3f}' for v in vals)} | {statistics.mean(vals):.3f} ± {sd} | "
                     f"{statistics.mean(diffs):+.3f} ({dsd}) | {params:,} |" if diffs else
                     f"| {arm} | {' '.join(f'{v:.3f}' for v in vals)} | {statistics.mean(vals):.3f} ± {sd} | - | "
                     f"{params:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "glue" / "cola"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--parallel", type=int, default=9)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/decoder_runs"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.parallel < 1:
        parser.error("--steps and --parallel must be >= 1")
    from dora_lab.run.config import load_config  # every run's config is checked before any starts

    for arm in args.arms:
        for seed in args.seeds:
            load_config(REPO / "configs" / "smollm2_cola.yaml", overrides(args, arm, seed))
    args.runs.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, args, arm, seed) for arm, seed in jobs]
        results = [f.result() for f in tqdm(futures, desc="decoder ablation runs", unit="run")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "model": args.model, "runs": results}, indent=1))
    failed = [f"{r['arm']}-s{r['seed']} (rc {r['rc']}, log {args.runs}/{r['arm']}-s{r['seed']}.log)"
              for r in results if r["rc"] != 0]
    print("\n".join(table(results)))
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
