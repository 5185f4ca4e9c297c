"""The pictures of an ablation report (matplotlib, Agg backend), from plain numbers.

- :func:`metric_by_group`: each group's mean with its 95% t-interval as an error bar, and every
  run as a dot (so three seeds are seen as three seeds, not as a bar).
- :func:`allocation_panels`: the final rank of every adapted matrix (layers x module types), one
  heatmap per group side by side, averaged over the group's runs, on one colour scale.
- :func:`budget_curves`: the schedule's budget at every optimizer step, one line per group.
- :func:`quality_curves`: the metric against adapter parameters, one curve per method with seed bands.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from ..track.plots import allocation_grid, plt, save_figure
from .stats import Summary

__all__ = ["allocation_panels", "budget_curves", "metric_by_group", "quality_curves"]

F = TypeVar("F", bound=Callable[..., Any])


def _plain(draw: F) -> F:
    """Draw in matplotlib's default style, whatever style another library set for the process
    (Optuna's plots switch to ggplot)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.style.context("default"):
            return draw(*args, **kwargs)

    return cast(F, wrapper)


@_plain
def metric_by_group(labels: Sequence[str], summaries: Sequence[Summary], points: Sequence[Sequence[float]],
                    ylabel: str, path: str | Path, references: Collection[str] = ()) -> Path:
    """``references``: the labels of reference groups (drawn grey and marked)."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(labels) + 2), 3.8))
    for i, (s, pts) in enumerate(zip(summaries, points, strict=True)):
        colour = "tab:gray" if labels[i] in references else "tab:blue"
        if not math.isnan(s.ci_low):
            ax.errorbar(i, s.mean, yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], fmt="o", color=colour,
                        capsize=6, lw=1.6, ms=7, zorder=3)
        else:
            ax.plot(i, s.mean, "o", color=colour, ms=7, zorder=3)
        jitter = [0.2 + 0.1 * (j / (len(pts) - 1) - 0.5) if len(pts) > 1 else 0.2 for j in range(len(pts))]
        ax.plot([i + x for x in jitter], list(pts), ".", color="black", alpha=0.6, ms=5, zorder=2)
    ax.set_xticks(range(len(labels)), [f"{lab}\n(reference)" if lab in references else lab for lab in labels],
                  fontsize=8, rotation=20 if max(map(len, labels), default=0) > 14 else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title("mean with 95% t-interval; dots: single runs", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return cast(Path, save_figure(fig, path))


@_plain
def allocation_panels(panels: Sequence[tuple[str, Mapping[str, float]]], path: str | Path,
                      vmax: float | None = None, per_row: int = 3,
                      label: str = "final rank (mean over runs)") -> Path:
    """``panels``: (group label, or a trial's name; mean final rank per matrix name), side by side on one
    colour scale (``vmax``, default the largest rank shown), ``per_row`` to a row."""
    n = max(1, len(panels))
    cols = min(per_row, n)
    rows = math.ceil(n / cols)
    grids = [allocation_grid(cast(Mapping[str, int], alloc)) for _, alloc in panels]
    top = vmax if vmax is not None else max([v for _, _, g in grids for row in g for v in row if v == v] or [1])
    n_cols = max([len(c) for _, c, _ in grids] or [1])
    n_rows = max([len(r) for r, _, _ in grids] or [1])
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(0.9 + cols * (1.0 + 0.62 * n_cols), 0.9 + rows * (1.1 + 0.36 * n_rows)))
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        title, (layer_names, modules, grid) = panels[k][0], grids[k]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.1f}".rstrip("0").rstrip("."), ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * top else "black")
        ax.set_xticks(range(len(modules)), [_short(m) for m in modules], rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(layer_names)), [f"layer {r}" for r in layer_names], fontsize=7)
        ax.set_title(f"{title} ({sum(v for row in grid for v in row if v == v):.0f} comp.)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, label=label, shrink=0.8)
    return cast(Path, save_figure(fig, path))


def _short(module: str) -> str:
    """attention.self.query -> query, attention.output.dense -> attn.output, intermediate.dense -> intermediate"""
    return module.replace("attention.self.", "").replace("attention.", "attn.").removesuffix(".dense")


@_plain
def budget_curves(curves: Sequence[tuple[str, str, Sequence[int]]], path: str | Path) -> Path:
    """``curves``: (group label, unit, budget per step); one panel per unit."""
    units = list(dict.fromkeys(unit for _, unit, _ in curves)) or ["components"]
    fig, axes = plt.subplots(1, len(units), squeeze=False, figsize=(6.2 * len(units), 3.6))
    for ax, unit in zip(axes.flat, units, strict=True):
        for k, (label, u, curve) in enumerate(curves):
            if u == unit:
                ax.plot(range(1, len(curve) + 1), list(curve), label=label, lw=2.4 - 0.15 * (k % 8),
                        ls=("-", "--", ":", "-.")[k % 4], alpha=0.9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"budget ({unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("budget schedule per group (budget.json)", fontsize=9)
    fig.tight_layout()
    return cast(Path, save_figure(fig, path))


@_plain
def quality_curves(points: Sequence[Mapping[str, Any]], ylabel: str, path: str | Path) -> Path:
    """``points``: rows with ``curve``, ``adapter_parameters``, ``mean``, ``sd``, ``ci_low``, ``ci_high``
    (:func:`dora_lab.report.pareto.curve_points`); per curve the means joined by a line, the 95%
    t-interval as a band and +- one sd as error bars; a log x axis when sizes span over a factor 5."""
    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    names = list(dict.fromkeys(str(p["curve"]) for p in points))
    for k, name in enumerate(names):
        pts = sorted((p for p in points if p["curve"] == name and not math.isnan(p["adapter_parameters"])),
                     key=lambda p: p["adapter_parameters"])
        xs, ys = [p["adapter_parameters"] for p in pts], [p["mean"] for p in pts]
        colour = f"C{k % 10}"
        ax.errorbar(xs, ys, yerr=[0.0 if math.isnan(p["sd"]) else p["sd"] for p in pts], fmt="o-",
                    color=colour, capsize=3, lw=1.8, ms=5, label=f"{name} (n = {'/'.join(str(p['n']) for p in pts)})")
        band = [p for p in pts if not math.isnan(p["ci_low"])]
        if band:
            ax.fill_between([p["adapter_parameters"] for p in band], [p["ci_low"] for p in band],
                            [p["ci_high"] for p in band], color=colour, alpha=0.15, lw=0)
    sizes = [p["adapter_parameters"] for p in points if p["adapter_parameters"] > 0]
    if sizes and max(sizes) > 5 * min(sizes):
        ax.set_xscale("log")
    ax.set_xlabel("adapter parameters (final, mean over seeds)")
    ax.set_ylabel(ylabel)
    ax.set_title("mean over seeds; band: 95% t-interval; bars: +- sd", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return cast(Path, save_figure(fig, path))
