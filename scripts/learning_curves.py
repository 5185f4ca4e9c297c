"""Learning curves of finished runs: the task metric against the optimizer step, one line per run.

    python scripts/learning_curves.py RUN_DIR [RUN_DIR ...] --out docs/learning_curves

Each RUN_DIR is a ``python -m dora_lab.train`` run folder (its metrics.json holds the evaluation
history).  Writes ``curves.png`` (one panel per task) and ``curves.csv`` (task, run, step, metric), and
prints, per run, its best and last evaluation and whether it was still rising at its end (the rule of
:func:`dora_lab.run.convergence.still_rising`, the one every run and report uses).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dora_lab.run.convergence import still_rising  # noqa: E402


def read_run(run_dir: Path) -> tuple[str, str, list[tuple[int, float]]]:
    """(task, metric name, [(step, value), ...]) of one run folder."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    name = metrics["metric"]
    task = run_dir.name.split("_", 1)[0]
    points = [(int(row["step"]), float(row[name])) for row in metrics["history"]]
    return task, name, points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [(d, *read_run(d)) for d in args.runs if (d / "metrics.json").is_file()]
    tasks = sorted({task for _, task, _, _ in runs})
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    with (args.out / "curves.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "run", "step", "metric", "value"])
        for d, task, name, points in runs:
            ax = axes[0][tasks.index(task)]
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", label=d.name.split("_", 1)[1])
            ax.set_title(f"{task}: dev {name}")
            ax.set_xlabel("optimizer step")
            for s, v in points:
                writer.writerow([task, d.name, s, name, f"{v:.4f}"])
            best = max(values)
            rising = still_rising(values, steps)["still_rising"]
            print(f"{d.name}: best {best:.4f} at step {steps[values.index(best)]}, last {values[-1]:.4f}, "
                  f"still rising: {rising}")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
