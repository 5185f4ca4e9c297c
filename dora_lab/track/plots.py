"""Pictures of a run and of a study (matplotlib, Agg backend: no display needed).

- :func:`allocation_heatmap`: the final rank of every adapted matrix, layers x module types.
- :func:`budget_plot`: the schedule's budget and the active components over the steps.
- :func:`pareto_plot`: quality against size with the Pareto front drawn (a multi-objective study's
  parent run, and the report).

A trial's two figures are titled with the run they show (its name, scorer, schedule, seed, trial;
:func:`dora_lab.track.logger.figure_title`), the title wrapped to the figure's width.
- :func:`study_plots`: Optuna's optimization history, parameter importances and parallel
  coordinates (``optuna.visualization.matplotlib``).
"""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["allocation_grid", "allocation_heatmap", "budget_plot", "pareto_plot", "save_figure", "study_plots"]

# "bert.encoder.layer.3.attention.self.query" -> ("3", "attention.self.query"); decoders' "layers.3.*",
# GPT-2's "h.3.*" and T5's "block.3.*" alike.
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.(.+)$")


def allocation_grid(allocation: Mapping[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """``(rows, columns, cells)``: layer indices x module types; a missing pair is NaN.

    >>> allocation_grid({"enc.layer.0.q": 2, "enc.layer.0.v": 3, "enc.layer.1.q": 1})
    (['0', '1'], ['q', 'v'], [[2.0, 3.0], [1.0, nan]])
    """
    cells: dict[tuple[str, str], int] = {}
    rows: list[str] = []
    cols: list[str] = []
    for name, rank in allocation.items():
        m = _LAYER.search(name)
        row, col = (m.group(1), m.group(2)) if m else ("-", name)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        cells[(row, col)] = rank
    grid = [[float(cells.get((r, c), float("nan"))) for c in cols] for r in rows]
    return rows, cols, grid


def allocation_heatmap(allocation: Mapping[str, int], path: str | Path, r0: int | None = None,
                       title: str = "") -> Path:
    """Save a heatmap of the final ranks (the number in each cell) to ``path`` (PNG)."""
    rows, cols, grid = allocation_grid(allocation)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.1 * len(cols)), 1.8 + 0.5 * max(1, len(rows))))
    vmax = r0 if r0 is not None else max([v for row in grid for v in row if v == v] or [1])
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{int(value)}", ha="center", va="center",
                        color="white" if value < 0.6 * vmax else "black", fontsize=9)
    ax.set_xticks(range(len(cols)), [c.replace("attention.", "attn.") for c in cols], rotation=35, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(rows)), [f"layer {r}" for r in rows], fontsize=8)
    total = int(sum(v for row in grid for v in row if v == v))
    ax.set_title(_wrap(title or f"final rank per matrix ({total} components)", fig), fontsize=9)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    return save_figure(fig, path)


def budget_plot(curve: Sequence[int], unit: str, path: str | Path,
                active: Mapping[int, float] | None = None, title: str = "") -> Path:
    """The schedule's budget at every step and, when given, the measured active count."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(curve) + 1), list(curve), label=f"budget ({unit})", lw=2)
    if active:
        steps = sorted(active)
        ax.plot(steps, [active[s] for s in steps], "--", label=f"active {unit}", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(unit)
    ax.set_title(_wrap(title or "budget over training", fig), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def pareto_plot(points: Sequence[tuple[float, float]], front: Sequence[int], path: str | Path, xlabel: str,
                ylabel: str, maximize_y: bool = True, labels: Sequence[str] = (), title: str = "") -> Path:
    """Quality (y) against size (x, fewer is better): every point grey, the Pareto ``front`` (its
    positions in ``points``) in colour, joined by the staircase of what is attainable (for each size,
    the best quality at that size or less); ``labels`` name the front's points (trial numbers, say).
    A log x axis when the sizes span more than a factor 5; matplotlib's default style (Optuna's
    plots switch the process to ggplot)."""
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6.2, 4.0))
        _draw_front(ax, points, front, maximize_y, labels)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(_wrap(title or f"{ylabel} against {xlabel}", fig), fontsize=9)
        fig.tight_layout()
        return save_figure(fig, path)


def _draw_front(ax: Any, points: Sequence[tuple[float, float]], front: Sequence[int], maximize_y: bool,
                labels: Sequence[str]) -> None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, "o", color="tab:gray", alpha=0.55, ms=5, label="trials / runs")
    best = sorted((points[i] for i in front), key=lambda p: (p[0], -p[1] if maximize_y else p[1]))
    if best:
        ax.step([p[0] for p in best], [p[1] for p in best], where="post", color="tab:red", lw=1.6, alpha=0.8)
        ax.plot([p[0] for p in best], [p[1] for p in best], "o", color="tab:red", ms=7, label="Pareto front")
    names: dict[tuple[float, float], list[str]] = {}  # equal points (a repeated trial) share one label
    for i, text in zip(front, labels, strict=False):
        names.setdefault((points[i][0], points[i][1]), []).append(text)
    for point, texts in names.items():
        ax.annotate(", ".join(texts), point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    positive = [x for x in xs if x > 0]
    if positive and max(positive) > 5 * min(positive):
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _wrap(title: str, fig: Any) -> str:
    """``title``'s lines wrapped to the figure's width (about 13 characters an inch at 9 pt)."""
    width = max(20, int(fig.get_figwidth() * 13))
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def study_plots(study: Any, folder: str | Path, target_name: str = "objective") -> dict[str, str]:
    """Optuna's matplotlib plots of ``study`` into ``folder``; returns ``{file: note}`` for the
    plots that could not be drawn (too few trials, one parameter ...)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    notes: dict[str, str] = {}
    # a multi-objective study: Optuna's plots of one value take the first objective (the metric)
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, target=target,
                                                                          target_name=target_name),
        "param_importances.png": lambda: ovm.plot_param_importances(study, target=target, target_name=target_name),
        "parallel_coordinate.png": lambda: ovm.plot_parallel_coordinate(study, target=target,
                                                                        target_name=target_name),
    }
    for name, draw in plots.items():
        if name == "param_importances.png" and len(complete) < 2:
            notes[name] = f"skipped: parameter importances need >= 2 complete trials, the study has {len(complete)}"
            continue
        if not complete:
            notes[name] = "skipped: no complete trial yet"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig: Any = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
            # parallel coordinates: one axis per parameter, each with its own tick labels; give
            # every axis ~1.7 inches so that neighbouring labels do not overlap
            width = max(8.0, 1.7 * (len(complete[0].params) + 1)) if name.startswith("parallel") else 8.0
            fig.set_size_inches(width, 5)
            fig.tight_layout()
            save_figure(fig, folder / name)
        except Exception as exc:  # a picture must never fail the study
            notes[name] = f"skipped: {type(exc).__name__}: {exc}"
            plt.close("all")
    return notes


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its folder made), close it, return the path; shared with :mod:`dora_lab.report.plots`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
