"""The report's sections (Markdown), each from the numbers :func:`.compare.build` computed: the
results per group, the paired comparisons with their power columns and seed plan, the convergence and
majority-class warnings, the results over tasks, the agreement between scorers.
The numbers come from :mod:`.conclusions` (through :func:`.compare.build`); formulas in docs/statistics.md."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from scipy import stats as sps

from ..track.tables import markdown_table
from .text import fmt_ci, fmt_int, fmt_num, fmt_p

__all__ = ["agreement_section", "comparison_cells", "comparisons_section", "conclusion_notes", "flags_section",
           "groups_section", "study_seeds_note", "tasks_section"]


def comparison_cells(c: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, str]:
    """The power (and plan) cells of one row of the paired-comparisons table."""
    cells = {f"MDD (power {c['power']:g})": fmt_num(c["mdd"])}
    if options.get("min_effect"):
        need = c["seeds_for_min_effect"]
        cells[f"seeds for {options['min_effect']:g}"] = "n/a" if math.isnan(need) else f"{need:.0f}"
    if options.get("half_width") and options.get("common_seeds"):  # study.seeds: the pilot's sd, the cap
        cells["pilot sd (pairs)"] = f"{fmt_num(c.get('pilot_sd', math.nan))} ({c.get('pilot_pairs', 'n/a')})"
        cells["seed plan"] = f"{c.get('planned_seeds', 'n/a')} ({c['plan']}{', capped' if c.get('capped') else ''})"
        cells["Stein 95% CI"] = fmt_ci(c.get("stein_low", math.nan), c.get("stein_high", math.nan))
    elif options.get("half_width"):
        cells["seed plan"] = f"{c.get('planned_seeds', 'n/a')} ({c['plan']})"
        cells["Stein 95% CI"] = fmt_ci(c.get("stein_low", math.nan), c.get("stein_high", math.nan))
    return cells


def conclusion_notes(options: Mapping[str, Any], comparisons: Sequence[Mapping[str, Any]] = (),
                     source: Any = None) -> list[str]:
    """The bullets under the comparisons table that say how the power columns and the plan are made
    (and, when the plan wants more seeds, the command that runs them for the first study)."""
    power = options.get("power") or 0.8
    out = [f"- MDD (power {power:g}): the minimum detectable difference, the true mean difference the two-sided "
           f"paired t-test at alpha 0.05 (unadjusted) detects with probability {power:g} at this comparison's "
           "pairs, taking the observed sd of the differences as the truth: exact, from the noncentral t "
           "(scipy.stats.nct). A difference smaller than the MDD is not evidence of no difference: these runs "
           "could not have seen it. With one pair or no spread it is n/a."]
    if options.get("min_effect"):
        out.append(f"- seeds for {options['min_effect']:g} (report.min_effect): the fewest paired seeds whose "
                   f"test detects a true difference of {options['min_effect']:g} with probability {power:g} "
                   "at the observed sd (the same exact power).")
    if options.get("half_width") and options.get("common_seeds"):
        out.append(study_seeds_note(options, comparisons))
    elif options.get("half_width"):
        n0, cap = options.get("pilot_seeds") or 3, options.get("max_seeds") or 20
        out.append(f"- seed plan (report.half_width = {options['half_width']:g}): fixed from a pilot, Stein's "
                   f"two-stage rule. The pilot is the {n0} smallest common seeds; from its sd s0, "
                   f"n = max({n0}, ceil((t(0.975, {n0 - 1}) s0 / {options['half_width']:g})^2)), at most {cap}. "
                   "The analysis uses exactly the n smallest seeds (runs beyond n are left out, so adding runs "
                   "cannot move the conclusion); *interim* means fewer than n seeds ran, not the final analysis. "
                   "Stein 95% CI: mean +- t(0.975, n0 - 1) s0 / sqrt(n), half-width at most the target "
                   "(unless capped) and exact 95% coverage for normal differences. To run the missing seeds "
                   "(comparisons.csv `seeds_to_run`), start a second study with the same config and only those "
                   "seeds (Optuna cannot add choices to a study's categorical `seed`): `python -m dora_lab.study "
                   "CONFIG --set study.name=NAME_more --set 'study.space.seed={type: categorical, choices: "
                   "[SEEDS]}'`, and report both: `python -m dora_lab.report CONFIG` with `report.include: "
                   "[NAME_more]` (or both study names with `--storage`).")
        todo = sorted({int(x) for c in comparisons for x in str(c.get("seeds_to_run") or "").split()})
        if todo and source is not None:
            config = source.path or "CONFIG"
            out.append(f"- **To reach the planned seeds**: `python -m dora_lab.study {config} --set "
                       f"study.name={source.name}_more --set 'study.space.seed={{type: categorical, choices: "
                       f"[{', '.join(map(str, todo))}]}}'`, then this report with `report.include: "
                       f"[{source.name}_more]`.")
    return out


def study_seeds_note(options: Mapping[str, Any], comparisons: Sequence[Mapping[str, Any]]) -> str:
    """The rule a ``study.seeds`` study ran (Stein's two-stage rule, one n for every comparison)."""
    n0, cap, h = options.get("pilot_seeds") or 3, options.get("max_seeds") or 20, options["half_width"]
    planned = sorted({int(c["planned_seeds"]) for c in comparisons if c.get("planned_seeds")})
    capped = [str(c["group"]) for c in comparisons if c.get("capped")]
    interim = any(str(c.get("plan", "")).startswith("interim") for c in comparisons)
    return (f"- seed plan (study.seeds: pilot {n0}, target half-width {h:g}, cap {cap}), fixed from the pilot by "
            f"Stein's two-stage rule and run by the study: seeds 0 to {n0 - 1} of every group first; for each "
            f"comparison the sd s0 of its pilot's paired differences (*pilot sd*, over the pilot pairs both groups "
            f"completed) gives its own n = max({n0}, ceil((t(0.975, {n0 - 1}) s0 / {h:g})^2)); the study then ran "
            f"the largest of these, at most {cap}, for every group: **N = {', '.join(map(str, planned)) or 'n/a'}** "
            f"(*seed plan*: N planned, and whether it is final; *pairs*: N run, the seeds both groups completed). "
            + (f"**The cap bound** for {', '.join(capped)}: those intervals stay wider than {h:g}. " if capped
               else "The cap did not bind. ")
            + "*Stein 95% CI* = mean over the N seeds +- t(0.975, n0 - 1) s0 / sqrt(N) (the pilot's t and sd): "
            f"what the rule guarantees, exact 95% coverage for normal differences and half-width at most {h:g} "
            "unless capped (N depends on the pilot only through its sample covariance, independent of every "
            "mean; docs/statistics.md). The *95% CI* column beside it is the ordinary paired t-interval over the "
            "same N seeds, for comparison; its width was not planned."
            + (" *interim*: seeds of the plan have not run yet; run the same study command again (study.seeds "
               "adds the missing seeds only)." if interim else ""))


def flags_section(data: Mapping[str, Any]) -> list[str]:
    """## Convergence and learning: each run still rising, each group at the majority class."""
    md = ["## Convergence and learning", ""]
    warnings = data.get("warnings") or []
    judged = [f for f in data.get("flags") or [] if f["still_rising"] is not None]
    if warnings:
        md += ["**Warning:** " + ("a difference between groups may only be a difference in speed, or in "
                                  "whether a run learned at all:"), ""] + [f"- {w}" for w in warnings] + [""]
    else:
        md += [f"No run is still rising ({len(judged)} judged) and no group is at the majority class.", ""]
    md += ["Still rising (dora_lab.run.convergence): over the run's evaluations h_1..h_m (m >= 3), the last one "
           "beats every earlier one by more than tol, or the least-squares line over the last third "
           "(max(3, ceil(m / 3)) evaluations) rises by more than tol across them; tol = max(0.005, 1% of the "
           "best value). At the majority class: MCC <= 0, or accuracy <= the majority class's share of the "
           "validation split (metrics.json `checks.majority_share`). Per run in flags.csv; the runs also "
           "carry the MLflow tags `dora_lab.still_rising` and `dora_lab.at_majority`.", ""]
    return md


def tasks_section(data: Mapping[str, Any]) -> list[str]:
    """## Across tasks: mean ranks and the stratified paired test (nothing with a single task)."""
    tasks = data.get("tasks")
    if not tasks:
        return []
    md = ["## Across tasks", "",
          f"Tasks: {', '.join(tasks['tasks'])}. Each task's groups are in the tables above (the `task.name` "
          "column); each task's value is its own study's metric.", "",
          "**Mean rank.** Per task the groups are ranked by mean (1 = best; ties share the average rank); the "
          "mean rank is the average over the tasks. Only groups present in every task are ranked.", "",
          markdown_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
                          for r in tasks["ranks"]]) if tasks["ranks"] else "(no group ran on every task)\n"]
    if tasks["left_out"]:
        md += [f"Not ranked (missing on some task): {', '.join(tasks['left_out'])}.", ""]
    if tasks["pooled"]:
        md += ["**Pooled paired test over tasks x seeds (stratified).** For each group against its reference: "
               "D = the mean over tasks of each task's mean paired difference (every task weighs the same); "
               "se = sqrt(sum_k s_k^2 / n_k) / K; t = D / se with Welch-Satterthwaite df "
               "(sum v_k)^2 / sum(v_k^2 / (n_k - 1)), v_k = s_k^2 / n_k. Stratified rather than pooling the raw "
               "differences because the tasks' metrics differ in scale and spread (MCC, accuracy): pooled, the "
               "noisier task would set the variance of both and a task with more seeds would weigh more. With "
               "one task it is the paired t-test. Every task needs 2 seeds or more.", "",
               markdown_table([{"group": r["group"], "reference": r["reference"], "tasks": r["tasks"],
                                "pairs": r["pairs"], "D": fmt_num(r["mean_diff"]), "95% CI": fmt_ci(r["ci_low"], r["ci_high"]),
                                "t (df)": f"{fmt_num(r['t'], 3)} ({fmt_num(r['df'], 1)})", "p": fmt_p(r["p_t"])}
                               for r in tasks["pooled"]])]
    return md


def groups_section(data: Mapping[str, Any]) -> list[str]:
    """Results per group: n, mean, sd, the Student-t interval and the sizes, with how to read them."""
    groups = data["groups"]
    md: list[str] = []
    n_min = min([g["n"] for g in groups if g["n"] > 1] or [0])
    t_note = f"; with n = {n_min}, t(0.975, {n_min - 1}) = {sps.t.ppf(0.975, n_min - 1):.2f}" if n_min else ""
    md += ["## Results per group", "",
           markdown_table([{"group": g["group"], "n": g["n"], "mean": fmt_num(g["mean"]), "sd": fmt_num(g["sd"]),
                            "95% CI": fmt_ci(g["ci_low"], g["ci_high"]), "min": fmt_num(g["min"]), "max": fmt_num(g["max"]),
                            "last eval (mean)": fmt_num(g["final_mean"]),
                            "trainable params": fmt_int(g["trainable_parameters"]),
                            "adapter params (final)": fmt_int(g["adapter_parameters_final"]),
                            "components": fmt_int(g["active_components"]), "min/run": fmt_num(g["minutes"], 2),
                            "seeds": g["seeds"]} for g in groups]),
           "![metric by group](metric_by_group.png)", "",
           "sd is the sample standard deviation (n - 1). 95% CI: the two-sided Student-t interval for the mean, "
           f"mean +- t(0.975, n - 1) sd / sqrt(n) (scipy.stats.t){t_note}: "
           "with few seeds the intervals are wide by construction. Trainable params: every trainable parameter "
           "at the start "
           "(adapters at the start rank + the head); adapter params (final): the active adapter parameters "
           "after pruning; components: the active rank-1 components at the end; last eval: the mean of "
           f"`{data['metric_key']}` at each run's last evaluation (metrics.json).", ""]
    return md


def comparisons_section(data: Mapping[str, Any], reference: Mapping[str, Any], source: Any) -> list[str]:
    """The paired comparisons against the reference group: the table, its columns' meaning, the notes
    on what they allow to conclude."""
    groups, comparisons = data["groups"], data["comparisons"]
    pairs = min([c["n"] for c in comparisons] or [0])
    md: list[str] = []
    md += ["## Paired comparisons against the reference", ""]
    if comparisons:
        ref = ", ".join(f"`{k}` = {v}" for k, v in reference.items())
        md += [f"Reference: {ref}. Each group is compared with the reference group that has the same other "
               "factors, run by run with the same seed (same data order; the same initialisation where the adapters "
               "have the same shapes); the difference is "
               "group - reference.", "",
               markdown_table([{"group": c["group"], "reference": c["reference"], "pairs": c["n"],
                                "mean diff": fmt_num(c["mean_diff"]), "95% CI": fmt_ci(c["ci_low"], c["ci_high"]),
                                "t (df)": f"{fmt_num(c['t'], 3)} ({c['df']})", "p (paired t)": fmt_p(c["p_t"]),
                                "p (Holm)": fmt_p(c["p_holm"]), "p (sign-flip, exact)": fmt_p(c["p_sign_flip"]),
                                **comparison_cells(c, data.get("options") or {})}
                               for c in comparisons]),
               "- 95% CI: the Student-t interval of the mean paired difference.",
               "- p (paired t): two-sided paired t-test (scipy.stats.ttest_rel) of mean difference = 0.",
               f"- p (Holm): the paired-t p-values adjusted by Holm's step-down method over the {len(comparisons)} "
               "comparison(s) of this table (controls the family-wise error rate). Read significance from this "
               "column.",
               "- p (sign-flip, exact): two-sided permutation test over all 2^n sign assignments of the n "
               "differences "
               "(no normality assumed; up to 20 pairs). Its smallest possible value is 2 / 2^n "
               f"({fmt_p(2 / 2 ** pairs) if pairs else 'n/a'} for n = {pairs}): below 6 pairs it cannot reach 0.05, "
               "whatever the data. A paired-t p far below that floor rests on the t-test's normality assumption.",
               *conclusion_notes(data.get("options") or {}, comparisons, source), ""]
    else:
        md += ["No comparison: " + ("a single group." if len(groups) < 2 else "see Notes."), ""]
    return md


def agreement_section(agreement: Sequence[Mapping[str, Any]], factors: Sequence[str]) -> list[str]:
    """Which components the scorers rank high: Kendall's tau and top-k overlap per pair of groups."""
    md: list[str] = []
    md += ["## Agreement between scorers", ""]
    if agreement:
        md += ["Which components do scorers rank high? From each run's scores.json: the score of every component "
               "(all layers) at the last pruning decision. Kendall's tau-b (scipy.stats.kendalltau) over all "
               "components; top-k overlap = |top-k(A) & top-k(B)| / k with k = the final budget in components. "
               "*scorer vs scorer* pairs runs of the same seed (same initialisation, so component i is the same "
               "vector at the start). *seed vs seed* pairs one group's runs across seeds: there component i starts "
               "from other random vectors, so it shows the chance level (tau near 0, top-k near k/N, given as "
               "*chance k/N*), a floor rather than a like-for-like baseline. Each run's scores come from its own "
               "training (the runs diverge once their masks differ), so disagreement includes that drift.",
               "", markdown_table(_agreement_summary(agreement))]
    else:
        md += ["Not computed: " + ("the scorer does not vary between the groups." if "scorer.name" not in factors
                                   else "see Notes."), ""]
    return md


def _agreement_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    by: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["group_a"], r["group_b"], r["kind"]), []).append(r)
    out = []
    for (a, b, kind), rs in sorted(by.items(), key=lambda kv: (kv[0][2] != "scorer vs scorer", kv[0])):
        tau, top = [r["kendall_tau"] for r in rs], [r["top_k_overlap"] for r in rs]
        out.append({"A": a, "B": b, "kind": kind, "pairs": len(rs),
                    "Kendall tau: mean [min, max]": f"{sum(tau) / len(tau):.3f} [{min(tau):.3f}, {max(tau):.3f}]",
                    "top-k overlap: mean [min, max]": f"{sum(top) / len(top):.3f} [{min(top):.3f}, {max(top):.3f}]",
                    "chance k/N": " ".join(sorted({f"{r['k'] / r['components']:.3f}" for r in rs})),
                    "k": " ".join(sorted({str(r["k"]) for r in rs})),
                    "components": " ".join(sorted({str(r["components"]) for r in rs}))})
    return out
