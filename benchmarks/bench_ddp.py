"""Step time of one training run in 1 vs N data-parallel processes at the same global batch.

    python benchmarks/bench_ddp.py CONFIG [--processes 1 2] [--global-batch 32] [--steps 40]
        [--set key=value ...] [--out benchmarks/results]

Each count runs ``python -m dora_lab.train``'s own loop (:func:`dora_lab.run.train.train_run`; N > 1
under ``torchrun --standalone``) with ``train.batch_size = global batch / N`` for ``--steps``
optimizer steps, no evaluation before the last step, no adapter saved.  Rank 0 times every
optimizer step (the wall time between two ``on_step`` hooks: data, forward, backward, gradient
all-reduce, AdamW, the controller); the first quarter of the steps is dropped as warm-up.  It
writes ``bench_ddp.json`` and prints a Markdown table (median step, p10/p90, speed-up against 1).
Strong scaling: the same work is split, so a speed-up above 1 needs ranks on their own devices
(two ranks sharing one GPU or two shared CPU cores measure the overhead, not a gain).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class _StepTimer:
    """A TrainCallback (duck-typed) that keeps the time of every ``on_step``."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_begin(self, info: object) -> None:
        self.stamps.append(time.perf_counter())

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.stamps.append(time.perf_counter())

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, result: object) -> None: ...


def _child(out: Path, config: str, overrides: list[str]) -> None:
    from dora_lab.run import distributed
    from dora_lab.run.config import load_config
    from dora_lab.run.models import resolve_device
    from dora_lab.run.train import train_run

    cfg = load_config(config, overrides)
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as run_dir:  # rank 0's folder is the run's (train_run says so)
        train_run(cfg, run_dir, [timer], progress=False)  # type: ignore[list-item]
    if distributed.is_main():
        steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
        device = resolve_device(cfg.model.device)
        out.write_text(json.dumps({"processes": distributed.world_size(), "device": str(device),
                                   "step_seconds": steps[len(steps) // 4 :]}))
    distributed.shutdown()


def run(config: str, processes: Sequence[int], global_batch: int, steps: int, sets: list[str]) -> list[dict[str, Any]]:
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for n in processes:
        if global_batch % n:
            raise SystemExit(f"--global-batch {global_batch} is not divisible by {n} processes")
        overrides = [*sets, f"train.batch_size={global_batch // n}", f"train.max_steps={steps}",
                     f"train.eval_every={10 * steps}", "train.save_adapter=false", "train.processes=1"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "times.json"
            child = [str(Path(__file__).resolve()), "--child", str(out), config, *[a for o in overrides for a in ("--set", o)]]
            launcher = [sys.executable] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            subprocess.run([*launcher, *child], env=env, check=True)
            rows.append(json.loads(out.read_text()))
    return rows


def table(rows: list[dict[str, Any]], global_batch: int) -> str:
    base = statistics.median(rows[0]["step_seconds"])
    lines = ["| processes | device | global batch | median step (ms) | p10 / p90 (ms) | speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = sorted(r["step_seconds"])
        med = statistics.median(s)
        p10, p90 = s[int(0.1 * (len(s) - 1))], s[int(0.9 * (len(s) - 1))]
        lines.append(f"| {r['processes']} | {r['device']} | {global_batch} | {1e3 * med:.1f} | "
                     f"{1e3 * p10:.1f} / {1e3 * p90:.1f} | {base / med:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        parser = argparse.ArgumentParser()
        parser.add_argument("--child", type=Path)
        parser.add_argument("config")
        parser.add_argument("--set", dest="sets", action="append", default=[])
        a = parser.parse_args(argv)
        _child(a.child, a.config, a.sets)
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("config", help="a run config, e.g. configs/cola.yaml")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = parser.parse_args(argv)
    rows = run(a.config, a.processes, a.global_batch, a.steps, a.sets)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_ddp.json").write_text(json.dumps(
        {"machine": platform.platform(), "cpus": os.cpu_count(), "config": a.config, "sets": a.sets,
         "global_batch": a.global_batch, "steps": a.steps, "runs": rows}, indent=1))
    print(table(rows, a.global_batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
