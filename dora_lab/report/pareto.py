"""Quality against budget in a report: the Pareto front of the runs and the budget curves.

- :func:`front_rows`: the runs no other run beats in both the metric and the adapter size (final
  active adapter parameters, metrics.json), by :func:`dora_lab.plan.objectives.pareto_front`; drawn
  as ``pareto.png`` (every run, the front as a staircase).  Shown when a study of the report is
  multi-objective (``study.objectives``), where it also says which runs are on Optuna's own front.
- :func:`curve_points`: one curve per combination of the factors that are not a budget
  (:data:`BUDGET_KEYS`: ``budget.target_params``, ``budget.target_rank``, ``adapter.r0``,
  ``final_rank``), one point per group: x the group's mean final adapter parameters, y its mean
  with the sd and the 95% t-interval over seeds (the group rows of
  :func:`dora_lab.report.compare.build`); drawn as ``budget_curves.png``.  Shown when a budget key
  is a factor and a curve has two budgets or more.
- :func:`matched`: each curve's point against the reference curve's point at the same budget
  (final adapter parameters within :data:`MATCH_TOLERANCE`), paired by seed
  (:func:`dora_lab.report.stats.paired_test`, Holm over the table).

:func:`section` writes the tables and pictures and returns the Markdown, for :func:`dora_lab.report.io.render`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..plan.objectives import pareto_front
from ..run.tasks import LOWER_IS_BETTER
from ..track.plots import pareto_plot
from ..track.tables import markdown_table, write_csv
from . import plots as report_plots
from .stats import holm, paired_test

__all__ = ["BUDGET_KEYS", "MATCH_TOLERANCE", "TABLES", "curve_points", "front_rows", "matched", "section"]

BUDGET_KEYS = ("budget.target_params", "budget.target_rank", "adapter.r0", "final_rank")
MATCH_TOLERANCE = 0.05  # "the same budget": final adapter parameters within 5% of the reference's
TABLES = ("pareto.csv", "budget_curves.csv", "budget_matched.csv")


def maximized(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


def _size(run: Any) -> float:
    return float(run.metrics.get("adapter_parameters_final", math.nan))


# -- the Pareto front -------------------------------------------------------------------------------
def front_rows(runs: Sequence[Any], group_of: Mapping[int, str], metric: str) -> tuple[list[dict[str, Any]],
                                                                                      list[int]]:
    """(one row per run on the front, by adapter size; the front's positions in ``runs``): metric up,
    adapter parameters down.  Runs without a recorded size are left out of the front."""
    sized = [i for i, r in enumerate(runs) if not math.isnan(_size(r)) and not math.isnan(r.value)]
    points = [(runs[i].value, _size(runs[i])) for i in sized]
    on = [sized[k] for k in pareto_front(points, ["maximize" if maximized(metric) else "minimize", "minimize"])]
    rows = [{"study": runs[i].study, "trial": runs[i].trial, "group": group_of[id(runs[i])], "seed": runs[i].seed,
             "adapter_parameters_final": int(_size(runs[i])), "value": runs[i].value,
             "optuna_front": {None: "", True: "yes", False: "no"}[runs[i].front],
             "mlflow_run_id": runs[i].mlflow_run_id} for i in on]
    return sorted(rows, key=lambda r: (r["adapter_parameters_final"], r["study"], r["trial"])), on


# -- budget curves --------------------------------------------------------------------------------
def curve_points(groups: Sequence[Mapping[str, Any]], factors: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group, named by its curve (the non-budget factors' values) and ordered by size;
    empty unless a budget key is a factor and some curve has two points or more."""
    budget = [f for f in factors if f in BUDGET_KEYS]
    rest = [f for f in factors if f not in BUDGET_KEYS]
    if not budget:
        return []
    rows = []
    for g in groups:
        curve = ", ".join(f"{k.removesuffix('.name').split('.')[-1]}={g[k]}" for k in rest) or "all runs"
        rows.append({"curve": curve, "group": g["group"], **{k: g[k] for k in budget},
                     "adapter_parameters": g["adapter_parameters_final"], "n": g["n"], "mean": g["mean"],
                     "sd": g["sd"], "ci_low": g["ci_low"], "ci_high": g["ci_high"], "is_reference": g["is_reference"]})
    rows.sort(key=lambda r: (r["curve"], r["adapter_parameters"]))
    counts = {c: sum(r["curve"] == c for r in rows) for c in {r["curve"] for r in rows}}
    return rows if max(counts.values(), default=0) > 1 else []


def matched(points: Sequence[Mapping[str, Any]], members: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of a curve against the reference curve's point of the same budget (the curve
    holding the report's reference groups; sizes within :data:`MATCH_TOLERANCE`, the nearest),
    paired by seed: the per-seed values' difference (point - reference) and its paired test."""
    refs = {r["curve"] for r in points if r["is_reference"]}
    if len(refs) != 1:
        return []
    (ref_curve,) = refs
    base = [r for r in points if r["curve"] == ref_curve and not math.isnan(r["adapter_parameters"])]
    out = []
    for p in points:
        if p["curve"] == ref_curve or math.isnan(p["adapter_parameters"]) or not base:
            continue
        near = min(base, key=lambda b: abs(b["adapter_parameters"] - p["adapter_parameters"]))
        if abs(near["adapter_parameters"] - p["adapter_parameters"]) > MATCH_TOLERANCE * near["adapter_parameters"]:
            continue
        x, y = _per_seed(members[p["group"]]), _per_seed(members[near["group"]])
        seeds = sorted(set(x) & set(y))
        if not seeds:
            continue
        test = paired_test([x[s] for s in seeds], [y[s] for s in seeds])
        out.append({"curve": p["curve"], "group": p["group"], "reference": near["group"],
                    "adapter_parameters": p["adapter_parameters"],
                    "reference_adapter_parameters": near["adapter_parameters"], "seeds": " ".join(map(str, seeds)),
                    **{k: getattr(test, k) for k in test.__dataclass_fields__}})
    for row, p_holm in zip(out, holm([r["p_t"] for r in out]), strict=True):
        row["p_holm"] = p_holm
    return out


def _per_seed(runs: Sequence[Any]) -> dict[int, float]:
    seeds = sorted({r.seed for r in runs})
    return {s: sum(r.value for r in runs if r.seed == s) / sum(r.seed == s for r in runs) for s in seeds}


# -- the report's section -----------------------------------------------------------------------------
def _n(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _front_section(data: Mapping[str, Any], out: Path, metric: str) -> list[str]:
    runs = [r for members in data["members"].values() for r in members]
    if not any(r.front is not None for r in runs):
        return []
    group_of = {id(r): name for name, members in data["members"].items() for r in members}
    rows, on = front_rows(runs, group_of, metric)
    write_csv(rows, out / "pareto.csv")
    sized = [r for r in runs if not math.isnan(_size(r))]
    pareto_plot([(_size(r), r.value) for r in sized], [sized.index(runs[i]) for i in on], out / "pareto.png",
                xlabel="adapter parameters (final)", ylabel=metric, maximize_y=maximized(metric),
                labels=[f"{runs[i].study} t{runs[i].trial}" for i in on],
                title=f"{metric} against final adapter parameters: {len(on)} of {len(sized)} runs on the front")
    return ["## Pareto front: quality against adapter parameters", "",
            f"The runs no other run beats in both **{metric}** ({'higher' if maximized(metric) else 'lower'} is "
            "better) and final adapter parameters (fewer is better; metrics.json), over every run of this report. "
            "*Optuna's front*: whether the run is on its multi-objective study's own Pareto front "
            "(`study.best_trials`, over that study's trials and every objective; blank for a single-objective "
            "study). Each run is one seed: a point on the front may be a lucky seed, so read it with the group "
            "table above.", "",
            markdown_table([{"study": r["study"], "trial": r["trial"], "group": r["group"], "seed": r["seed"],
                             "adapter params": f"{r['adapter_parameters_final']:,}", metric: _n(r["value"]),
                             "Optuna's front": r["optuna_front"]} for r in rows]),
            "![Pareto front](pareto.png)", ""]


def _curves_section(data: Mapping[str, Any], out: Path, metric: str, factors: Sequence[str]) -> list[str]:
    points = curve_points(data["groups"], factors)
    if not points:
        return []
    write_csv(points, out / "budget_curves.csv")
    report_plots.quality_curves(points, metric, out / "budget_curves.png")
    md = ["## Quality against budget", "",
          f"One curve per {', '.join(f'`{f}`' for f in factors if f not in BUDGET_KEYS) or 'study'}, one point per "
          f"budget ({', '.join(f'`{f}`' for f in factors if f in BUDGET_KEYS)}): x is the group's mean final adapter "
          f"parameters (metrics.json), y the mean of **{metric}** over its seeds; the band is the 95% Student-t "
          "interval of the mean, the bars +- one sd.", "",
          markdown_table([{"curve": p["curve"], **{k: p[k] for k in factors if k in BUDGET_KEYS},
                           "adapter params": _n(p["adapter_parameters"], 0), "n": p["n"], "mean": _n(p["mean"]),
                           "sd": _n(p["sd"]), "95% CI": "n/a" if math.isnan(p["ci_low"]) else
                           f"[{p['ci_low']:.4f}, {p['ci_high']:.4f}]"} for p in points]),
          "![budget curves](budget_curves.png)", ""]
    pairs = matched(points, data["members"])
    write_csv(pairs, out / "budget_matched.csv")
    if pairs:
        md += [f"At matched budgets (final adapter parameters within {MATCH_TOLERANCE:.0%} of the reference "
               "curve's point), each point against the reference curve, paired by seed (difference = point - "
               "reference; paired t-test, Holm over this table):", "",
               markdown_table([{"curve": c["curve"], "group": c["group"], "reference": c["reference"],
                                "params / ref. params": f"{c['adapter_parameters']:,.0f} / "
                                                       f"{c['reference_adapter_parameters']:,.0f}",
                                "pairs": c["n"], "mean diff": _n(c["mean_diff"]),
                                "95% CI": "n/a" if math.isnan(c["ci_low"]) else
                                f"[{c['ci_low']:.4f}, {c['ci_high']:.4f}]", "p (Holm)": _n(c["p_holm"])}
                               for c in pairs]), ""]
    return md


def section(data: Mapping[str, Any], out: Path, metric: str, factors: Sequence[str]) -> list[str]:
    """The report's Markdown for the Pareto front and the budget curves (each only where it
    applies, see the module), their CSV tables and PNG pictures written to ``out``."""
    for name in (*TABLES, "pareto.png", "budget_curves.png"):  # not a stale one from an earlier report
        (out / name).unlink(missing_ok=True)
    return [*_front_section(data, out, metric), *_curves_section(data, out, metric, factors)]
