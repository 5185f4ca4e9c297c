"""Each allocation method's controller overhead per training step, against the step itself.

    python benchmarks/bench_methods.py [--quick] [--steps 804] [--out benchmarks/results]

One process, one fixed batch (the first 32 CoLA training sentences, MiniLM-tokenized), the
pretrained all-MiniLM-L6-v2 with dora_lab's adapter on its six linears per layer (r0 = 3, target
rank 2) and AdamW, as in ``configs/cola.yaml``: schedule ``dora``, warm-up 0.15, final 0.5,
interval 10, over ``--steps`` optimizer steps (804: three epochs of CoLA at batch 32).

The *step* is forward with the loss, backward, ``AdamW.step()``, ``zero_grad()`` without a
controller: its median over blocks of steps measured between the methods (so load from other
processes hits both alike).  A method's *overhead* is everything its controller adds over a whole
run, divided by the run's steps: ``controller.before_training`` (the one-shot allocator's
calibration forwards, 4 batches), plus ``controller.step(optimizer)`` at every one of the
``--steps`` steps (its hooks, its decisions, the validation forwards of a validation scorer, the
freeze and compaction).  A validation method scores on what ``dora_lab.train`` gives it: its
``rows`` spread over CoLA's validation split in length-sorted batches of 8.  To keep the run short the controller steps run on the gradients of one
real backward pass (kept, not zeroed; ``AdamW.step()`` on them, untimed, moves the weights between
controller steps); what the hooks cost does not depend on the gradients' values.  Not included: what a method changes in the forward pass itself (``dylora``'s prefix
mask, a multiply of ``r0`` numbers per layer; the pool's hard mask), which the step time of a
run under that method would show.  ``--quick`` swaps MiniLM for a tiny BERT and 40 steps (for
the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_speed.py: see its comment

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed.setup import (  # noqa: E402
    ALPHA,
    COLA_TRAIN,
    DROPOUT,
    START_RANK,
    TARGET_RANK,
    TARGETS,
    bert_from_config,
    load_batch,
    machine_info,
    minilm_dir,
    pretrained_minilm,
    share_frozen,
)

import dora_lab  # noqa: E402
from dora_lab import PruningController, inject_adapters, make_method, make_scorer  # noqa: E402
from dora_lab.run.batching import make_loader  # noqa: E402
from dora_lab.run.data import load_splits  # noqa: E402
from dora_lab.run.tasks import get_task  # noqa: E402
from dora_lab.run.validation import ValidationLoss  # noqa: E402

TARGET_SHARE = 0.05  # the target: under 5% of a step


def adapted(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = share_frozen(base)
    torch.manual_seed(1)
    inject_adapters(model, r0=START_RANK, targets=TARGETS, alpha=ALPHA, dropout=DROPOUT, trainable=["classifier"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    return model, opt


def step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out


def validation_batches(rows: int, quick: bool) -> list[dict[str, torch.Tensor]]:
    """What ``dora_lab.train`` scores a validation method on: ``rows`` rows spread over CoLA's
    validation split, in length-sorted batches (:meth:`TaskLoader.spread_batches`)."""
    from transformers import AutoTokenizer

    task = get_task("cola")
    split = load_splits(task, COLA_TRAIN.parent)["validation"]
    loader = make_loader(split, task, AutoTokenizer.from_pretrained(minilm_dir()), batch_size=64, shuffle=False)
    out = [{k: v for k, v in b.items() if k != "index"} for b in loader.spread_batches(rows)]
    for b in out:
        if quick:
            b["input_ids"] = b["input_ids"] % 100  # the tiny vocabulary
    return out


def method_overhead(name: str, base: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
                    quick: bool = False) -> dict[str, Any]:
    model, opt = adapted(base)
    controller = PruningController(model, make_scorer("magnitude", beta=0.9), "dora", steps, target_rank=TARGET_RANK,
                                   warmup=0.15, final=0.5, interval=10, method=make_method(name))
    method = controller.method
    if method.needs_validation:  # the training run's own path: rows spread over the validation split
        controller.set_validation(ValidationLoss(model, validation_batches(method.validation_rows or 32, quick),
                                                  contextlib.nullcontext()))
    t0 = time.perf_counter()
    model.eval()  # as train_run: no dropout while calibrating
    controller.before_training(lambda b: model(**b), [batch] * 4)
    calibration = time.perf_counter() - t0
    model.train()
    model(**batch).loss.backward()  # real gradients for the hooks, kept through the run
    per_step, decisions = [], 0
    for _ in range(steps):
        opt.step()  # untimed: the weights move as in training (sora's gates would only shrink otherwise)
        t0 = time.perf_counter()
        info = controller.step(opt)
        per_step.append(time.perf_counter() - t0)
        decisions += info.pruned
    total = calibration + sum(per_step)
    return {"calibration_s": calibration, "controller_s": sum(per_step), "decisions": decisions,
            "mean_ms": 1e3 * total / steps, "max_step_ms": 1e3 * max(per_step),
            "final_components": sum(controller.allocation().values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny BERT and 40 steps (for the tests)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the run (default 804)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 804)
    torch.manual_seed(0)
    base = bert_from_config(32, 2, 2, 64) if args.quick else pretrained_minilm()
    batch, batch_info = load_batch()
    if args.quick:
        batch = {k: (v % 100 if k == "input_ids" else v) for k, v in batch.items()}  # the tiny vocabulary
    names = dora_lab.list_methods()
    step_times: list[float] = []
    model, opt = adapted(base)
    step_seconds(model, opt, batch, 1 if args.quick else 2)  # warm-up, untimed
    results: dict[str, Any] = {}
    for name in names:
        step_times += step_seconds(model, opt, batch, 2 if args.quick else 4)
        results[name] = method_overhead(name, base, batch, steps, args.quick)
        print(f"{name}: {results[name]['mean_ms']:.2f} ms per step", file=sys.stderr)
    step_times += step_seconds(model, opt, batch, 2 if args.quick else 4)
    step_ms = 1e3 * statistics.median(step_times)
    for r in results.values():
        r["share_of_step"] = r["mean_ms"] / step_ms
    report: dict[str, Any] = {"machine": machine_info(), "batch": batch_info, "model": "tiny BERT" if args.quick else "all-MiniLM-L6-v2",
              "steps": steps, "step_median_ms": step_ms, "step_ms": [1e3 * s for s in step_times],
              "target_share": TARGET_SHARE, "methods": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_methods_quick" if args.quick else "bench_methods"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Allocation methods: controller overhead per step ({report['model']}, {steps} steps)", "",
             f"Training step without a controller (median of {len(step_times)}): {step_ms:.0f} ms. "
             f"Load average at start: {report['machine']['load_average_at_start']}.", "",
             "| method | calibration (s) | decisions | controller, mean per step (ms) | slowest step (ms) "
             "| share of a step | under 5% |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['calibration_s']:.2f} | {r['decisions']} | {r['mean_ms']:.2f} | "
                     f"{r['max_step_ms']:.0f} | {100 * r['share_of_step']:.2f}% | "
                     f"{'yes' if r['share_of_step'] < TARGET_SHARE else 'no'} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
