"""What a report may conclude: the power of each comparison, the seeds a stated effect needs, the
fixed number of seeds planned from a pilot, runs still learning or at the majority class, and the
results over several tasks.  :mod:`.compare` calls these while building; :mod:`.power` and
:mod:`.stats` hold the formulas; docs/statistics.md states them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from ..run.convergence import at_chance, still_rising
from ..run.tasks import get_task
from ..track.seed_plan import SeedPlan, common_plan, stein_half_width, stein_n
from .power import min_detectable_difference, seeds_needed
from .stats import CONFIDENCE, PairedTest, stratified_paired_test

__all__ = ["ALPHA", "across_tasks", "common_seeds", "greater_is_better", "metric_of", "planned_seeds", "power_row",
           "run_flags"]

ALPHA = 1 - CONFIDENCE
NAN = float("nan")


def greater_is_better(task: str) -> bool:
    """The task's direction (True for an unknown task name: the report's metrics are mostly scores)."""
    try:
        return get_task(task).greater_is_better
    except ValueError:  # RegistryError: a task from a plugin not loaded here
        return True


def power_row(test: PairedTest, options: Mapping[str, Any]) -> dict[str, Any]:
    """The minimum detectable difference at the comparison's pairs and sd, and the seeds that
    ``report.min_effect`` needs (at the unadjusted ``alpha``, two-sided, ``report.power``)."""
    power, effect = float(options.get("power") or 0.8), options.get("min_effect")
    sd = test.sd_diff
    need: float = NAN
    if effect and test.n >= 2 and math.isfinite(sd):
        need = float(seeds_needed(float(effect), sd, ALPHA, power))
    return {"mdd": min_detectable_difference(sd, test.n, ALPHA, power), "power": power,
            "min_effect": float(effect) if effect else NAN, "seeds_for_min_effect": need}


def planned_seeds(seeds: Sequence[int], diffs: Mapping[int, float], options: Mapping[str, Any],
                  common: int | None = None) -> tuple[list[int], dict[str, Any]]:
    """Stein's rule (:func:`.power.stein_n`) when ``report.half_width`` is set: the pilot is the
    ``report.pilot_seeds`` smallest common seeds, fixed before any result is seen; the final analysis
    uses the ``n`` smallest seeds, ``n`` planned from the pilot's sd (seeds beyond ``n`` are left
    out, so more runs never change ``n`` or the test).  ``common``: the one ``n`` of every comparison
    (:func:`common_seeds`, a ``study.seeds`` study), the pilot its seeds below ``pilot_seeds`` that both
    groups completed.  Returns (the seeds to analyse, the plan)."""
    h = options.get("half_width")
    if not h:
        return list(seeds), {}
    n0, cap = int(options.get("pilot_seeds") or 3), int(options.get("max_seeds") or 20)
    pilot = [diffs[s] for s in seeds if s < n0] if common else [diffs[s] for s in seeds[:n0]]
    if len(pilot) < (2 if common else n0):
        return list(seeds), {"plan": f"pilot incomplete: {len(pilot)} of {n0} seeds"}
    plan = stein_n(statistics.stdev(pilot), len(pilot), float(h), ALPHA, max(cap, len(pilot)))
    if common:
        plan = SeedPlan(plan.n0, plan.s0, common, plan.capped, stein_half_width(plan.s0, plan.n0, common))
    used = list(seeds[:plan.n])
    mean = statistics.fmean(diffs[s] for s in used)
    done = len(used) == plan.n
    more = [s for s in range(max(seeds) + plan.n + 1) if s not in seeds][:plan.n - len(used)]
    return used, {"plan": "final" if done else f"interim: {plan.n - len(used)} more seed(s) to run",
                  "seeds_to_run": " ".join(map(str, more)), "pilot_pairs": plan.n0,
                  "pilot_sd": plan.s0, "planned_seeds": plan.n, "capped": plan.capped,
                  "stein_low": mean - plan.half_width if done else NAN,
                  "stein_high": mean + plan.half_width if done else NAN}


def common_seeds(diffs: Sequence[Mapping[int, float]], options: Mapping[str, Any]) -> int | None:
    """The one number of seeds of every comparison when ``report.common_seeds`` (a ``study.seeds``
    study): the largest Stein plan over the comparisons' pilots (``diffs``: per comparison, seed ->
    paired difference), as the study planned it (:func:`~dora_lab.track.seed_plan.common_plan`)."""
    if not (options.get("common_seeds") and options.get("half_width")):
        return None
    n0, cap = int(options.get("pilot_seeds") or 3), int(options.get("max_seeds") or 20)
    pilots = {str(i): [d[s] for s in sorted(d) if s < n0] for i, d in enumerate(diffs)}
    return common_plan(pilots, n0, float(options["half_width"]), cap, ALPHA)[0]


def metric_of(run: Any, metric: str) -> str:
    """What ``run``'s value measures: its own study's metric where known (a report over tasks: MCC on
    CoLA, accuracy on SST-2, even though a CoLA run evaluates accuracy too), else the report's metric
    where the run evaluated it, else the run's own main metric."""
    if getattr(run, "metric", ""):
        return str(run.metric)
    return metric if metric in (run.metrics.get("final") or {}) else str(run.metrics.get("metric") or metric)


def run_flags(members: Mapping[str, Sequence[Any]], metric: str, value: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run (still rising over its last evaluations? its value at the majority class?)
    and the report's warnings: each run still rising, and each group with runs at the majority class
    (a group whose every run is there "has not learned")."""
    rows, warnings = [], []
    for group, runs in members.items():
        chance = []
        for r in runs:
            history = r.metrics.get("history") or []
            task = str(r.config.get("task.name", ""))
            m = metric_of(r, metric)
            archived = r.metrics.get("archived")  # read back from a report (report.archives): its flags
            rising = dict(archived) if archived else still_rising(
                [float(h[m]) for h in history if m in h],
                [float(h.get("step", i)) for i, h in enumerate(history) if m in h], greater_is_better(task)) \
                if m else {"still_rising": None}
            v = float((r.metrics.get("final") or {}).get(m, NAN)) if value == "final" else r.value
            flat = archived["at_majority"] if archived else at_chance(
                v, m, (r.metrics.get("checks") or {}).get("majority_share"))
            chance.append(flat)
            rows.append({"group": group, "seed": r.seed, "trial": r.trial,
                         "evaluations": archived["evaluations"] if archived else len(history),
                         "still_rising": rising["still_rising"], "last_gain": rising.get("last_gain", NAN),
                         "fitted_rise": rising.get("fitted_rise", NAN), "at_majority": flat})
            if rising["still_rising"]:
                fit = (f"fitted rise {rising['fitted_rise']:+.4f}, as the archived report {archived['folder']} "
                       f"found it" if archived else f"fitted rise over the last {rising['window']} evaluations "
                       f"{rising['fitted_rise']:+.4f}")
                warnings.append(f"{group}, seed {r.seed}: still rising at its last evaluation (last gain "
                                f"{rising['last_gain']:+.4f}, {fit}): train longer before comparing")
        hits = sum(c is True for c in chance)
        if hits == len(runs):
            warnings.append(f"{group}: has not learned: every run ({hits}) scores at the majority class "
                            "(no better than predicting the majority class of the validation split)")
        elif hits:
            warnings.append(f"{group}: {hits} of {len(runs)} runs at the majority class")
    return rows, warnings


def across_tasks(group_rows: Sequence[Mapping[str, Any]], arms: Mapping[tuple[str, str], list[tuple[
        str, list[float], list[float]]]]) -> dict[str, Any]:
    """Over several tasks: each arm's rank per task (1 = best mean; ties share the average rank),
    its mean rank over the tasks where every arm ran, and for each arm against its reference the
    stratified paired test over tasks x seeds (:func:`.stats.stratified_paired_test`).
    ``group_rows`` need ``task.name``, ``arm`` and ``mean``; ``arms`` maps (arm, reference arm) to
    ``[(task, arm's values, reference's values by common seed)]``."""
    tasks = sorted({str(g["task.name"]) for g in group_rows})
    names = list(dict.fromkeys(str(g["arm"]) for g in group_rows))
    means = {(str(g["task.name"]), str(g["arm"])): float(g["mean"]) for g in group_rows}
    full = [a for a in names if all((t, a) in means for t in tasks)]
    ranks: dict[str, dict[str, float]] = {a: {} for a in full}
    for t in tasks:
        sign = -1.0 if greater_is_better(t) else 1.0
        for a, r in zip(full, sps.rankdata([sign * means[(t, a)] for a in full]), strict=True):
            ranks[a][t] = float(r)
    rank_rows = [{"arm": a, **{f"rank {t}": ranks[a][t] for t in tasks},
                  "mean rank": float(np.mean(list(ranks[a].values())))} for a in full]
    pooled = []
    for (arm, ref), strata in arms.items():
        s = stratified_paired_test([(x, y) for _, x, y in strata])
        pooled.append({"group": arm, "reference": ref, "tasks": " ".join(t for t, _, _ in strata),
                       "pairs": s.n, "mean_diff": s.mean_diff, "se": s.se, "ci_low": s.ci_low, "ci_high": s.ci_high,
                       "t": s.t, "df": s.df, "p_t": s.p_t})
    return {"tasks": tasks, "ranks": sorted(rank_rows, key=lambda r: r["mean rank"]), "pooled": pooled,
            "left_out": [a for a in names if a not in full]}
