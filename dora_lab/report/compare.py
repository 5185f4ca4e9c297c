"""Ablation reports from finished studies:
``python -m dora_lab.report STUDY [STUDY ...] [--out DIR] [--reference KEY=VALUE ...]``.

``STUDY``: a study config (``--set`` overrides as for the study CLI) or a study name in ``--storage``.
The COMPLETE trials (Optuna) and their run folders are grouped by the factors that vary between
them (the searched keys but ``seed``, and any other differing key those do not fix) and compared:
per group n, mean, sd, 95% t-interval, min, max, sizes, minutes; each group against its reference,
paired by seed (paired t-test, Holm-adjusted; exact sign-flip p as a check); scorers' agreement on
components (Kendall tau, top-k overlap).  ``report.md``, CSV tables and PNGs go to ``DIR`` (default
``<output_dir>/report/<study>``) and to the study's MLflow parent run (``report/``).
Here: grouping, pairing and the numbers; :mod:`dora_lab.report.stats` the statistics,
:mod:`dora_lab.report.io` the reading and writing, :mod:`dora_lab.report.plots` the pictures.

A config's top-level ``report:`` block (read here, not by the study runner)::

    report:
      reference: {scorer.name: magnitude}   # the group(s) the others are compared with
      factors: [schedule.name, final_rank]  # instead of detecting them; final_rank = the measured
                                            # average active rank per matrix (allocation.json)
      include: [ablation_budget_constant.yaml]   # more studies (configs or names) pooled in
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..plan.report_block import parse_report
from ..run.config_yaml import ConfigError, parse_assignment
from ..run.environment import differences, distinct
from ..track.stores import StoreError, check_sqlite_store
from .archive import archived_runs
from .conclusions import across_tasks, common_seeds, metric_of, planned_seeds, power_row, run_flags
from .html import write_html
from .io import (
    Run,
    fmt,
    load_runs,
    log_to_mlflow,
    mlflow_parent,
    render,
    report_command,
)
from .sources import sources_of
from .stats import describe, holm, kendall_tau, paired_test, top_k_overlap

_MCC = ("matthews", "mcc")  # metric names of the Matthews correlation (majority_notes)

__all__ = ["build", "detect_factors", "main", "references"]

TASK = "task.name"  # a factor that makes strata: per-task tables, mean ranks, a stratified test
NOT_FACTORS = {"seed", "output_dir", "task.data_dir", "model.device", "plugins", "train.save_adapter"}
DERIVED = ("final_rank",)


# -- grouping -----------------------------------------------------------------------------------
def varying_keys(runs: Sequence[Run]) -> list[str]:
    """The config keys whose value differs between runs (not ``seed``, paths, devices, the study block)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    return [k for k in keys if k not in NOT_FACTORS and not k.startswith(("study", "report"))
            and len({r.factor(k) for r in runs}) > 1]


def detect_factors(runs: Sequence[Run], searched: set[str]) -> list[str]:
    """The searched keys that vary, then every other varying key not determined by those so far."""
    factors = [k for k in varying_keys(runs) if k in searched]
    for key in varying_keys(runs):
        if key not in factors and not _determined(runs, key, factors):
            factors.append(key)
    return factors


def side_keys(runs: Sequence[Run], factors: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys that vary but follow from the factors, keys that vary *within* groups)."""
    rest = [k for k in varying_keys(runs) if k not in factors]
    return [k for k in rest if _determined(runs, k, factors)], [k for k in rest if not _determined(runs, k, factors)]


def _determined(runs: Sequence[Run], key: str, by: Sequence[str]) -> bool:
    seen: dict[tuple[str, ...], str] = {}
    return all(seen.setdefault(tuple(r.factor(f) for f in by), r.factor(key)) == r.factor(key) for r in runs)


def _sort_key(values: Sequence[str]) -> tuple[tuple[int, float, str], ...]:
    def one(v: str) -> tuple[int, float, str]:
        try:
            return 0, float(v), ""
        except ValueError:
            return 1, 0.0, v
    return tuple(one(v) for v in values)


def label(factors: Sequence[str], key: Sequence[str]) -> str:
    if len(factors) == 1:
        return key[0]
    short = [f.removesuffix(".name").split(".")[-1] for f in factors]
    return ", ".join(f"{s}={v}" for s, v in zip(short, key, strict=True)) or "all runs"


def references(groups: Sequence[tuple[str, ...]], factors: Sequence[str],
               reference: dict[str, Any]) -> dict[tuple[str, ...], tuple[str, ...] | None]:
    """Each non-reference group -> its reference group: the same values except the reference keys
    set to the reference values (None where the study has no such group)."""
    for key, value in reference.items():
        if key not in factors:
            raise ConfigError(f"report.reference: {key!r} is not a factor of this study; factors: "
                              f"{', '.join(factors) or '(none: every run is alike)'}")
        values = sorted({g[factors.index(key)] for g in groups})
        if fmt(value) not in values:
            raise ConfigError(f"report.reference: {key}={fmt(value)} is not in the study; it has {', '.join(values)}")
    idx = {factors.index(k): fmt(v) for k, v in reference.items()}
    out: dict[tuple[str, ...], tuple[str, ...] | None] = {}
    for g in groups:
        if all(g[i] == v for i, v in idx.items()):
            continue
        target = tuple(idx.get(i, v) for i, v in enumerate(g))
        out[g] = target if target in groups else None
    return out


# -- the numbers --------------------------------------------------------------------------------
def default_reference(runs: Sequence[Run], factors: Sequence[str]) -> dict[str, str]:
    """The reference when none is named: the first group in sort order (``{}`` without factors)."""
    if not factors:
        return {}
    first_group = min({tuple(r.factor(f) for f in factors) for r in runs}, key=_sort_key)
    return dict(zip(factors, first_group, strict=True))


def _value(run: Run, value: str, metric: str) -> float:
    if value != "final":
        return run.value
    return float((run.metrics.get("final") or {}).get(metric_of(run, metric), math.nan))


def _per_seed(runs: Sequence[Run], value: str, metric: str) -> dict[int, float]:
    """One value per seed (the mean where a seed ran more than once)."""
    return {s: _mean([_value(r, value, metric) for r in runs if r.seed == s]) for s in {r.seed for r in runs}}


def _diffs(runs: Sequence[Run], reference: Sequence[Run], value: str, metric: str) -> dict[int, float]:
    """seed -> the paired difference (group - reference) over the seeds both ran."""
    x, y = _per_seed(runs, value, metric), _per_seed(reference, value, metric)
    return {s: x[s] - y[s] for s in sorted(set(x) & set(y))}


def _mean(values: Sequence[float]) -> float:
    ok = [v for v in values if v == v]
    return sum(ok) / len(ok) if ok else math.nan


def build(runs: Sequence[Run], factors: Sequence[str], reference: dict[str, Any], value: str = "objective",
          metric: str = "", options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain rows (no files written).  ``options``: the report block
    (``min_effect``, ``power``, ``half_width``, ``pilot_seeds``, ``max_seeds``; :mod:`.conclusions`)."""
    options = options or {}
    task_at = factors.index(TASK) if TASK in factors else None
    arm_factors = [f for f in factors if f != TASK]

    def arm(g: tuple[str, ...]) -> str:  # the group without its task
        return label(arm_factors, [v for i, v in enumerate(g) if i != task_at]) if arm_factors else "all runs"

    groups: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(r.factor(f) for f in factors), []).append(r)
    keys = list(groups)
    pairs = references(keys, factors, reference)
    keys.sort(key=lambda g: (g in pairs, _sort_key(g)))  # reference groups first
    notes: list[str] = []
    group_rows = []
    for g in keys:
        rs = sorted(groups[g], key=lambda r: (r.seed, r.study, r.trial))
        s = describe([_value(r, value, metric) for r in rs])
        group_rows.append({
            "group": label(factors, g), **dict(zip(factors, g, strict=True)), "n": s.n, "mean": s.mean,
            "sd": s.sd, "ci_low": s.ci_low, "ci_high": s.ci_high, "min": s.min, "max": s.max,
            "final_mean": _mean([_value(r, "final", metric) for r in rs]),
            "trainable_parameters": _mean([r.metrics.get("trainable_parameters", math.nan) for r in rs]),
            "adapter_parameters_final": _mean([r.metrics.get("adapter_parameters_final", math.nan) for r in rs]),
            "active_components": _mean([math.nan if r.components is None else r.components for r in rs]),
            "minutes": _mean([r.minutes for r in rs]), "seeds": " ".join(str(r.seed) for r in rs),
            "values": [_value(r, value, metric) for r in rs], "is_reference": g not in pairs,
            **({"arm": arm(g)} if task_at is not None else {})})
    comparisons = []
    arms: dict[tuple[str, str], list[tuple[str, list[float], list[float]]]] = {}
    common = common_seeds([_diffs(groups[g], groups[ref], value, metric) for g, ref in pairs.items() if ref], options)
    for g in keys:
        if g not in pairs:
            continue
        ref = pairs[g]
        if ref is None:
            notes.append(f"{label(factors, g)}: no reference group with the same other factors; not compared")
            continue
        x, y = _per_seed(groups[g], value, metric), _per_seed(groups[ref], value, metric)
        seeds = sorted(set(x) & set(y))
        if not seeds:
            notes.append(f"{label(factors, g)} vs {label(factors, ref)}: no seed in common; not compared")
            continue
        seeds, plan = planned_seeds(seeds, {s: x[s] - y[s] for s in seeds}, options, common)
        test = paired_test([x[s] for s in seeds], [y[s] for s in seeds])
        comparisons.append({"group": label(factors, g), "reference": label(factors, ref), "seeds":
                            " ".join(map(str, seeds)), **{k: getattr(test, k) for k in test.__dataclass_fields__},
                            **power_row(test, options), **plan})
        if task_at is not None:
            arms.setdefault((arm(g), arm(ref)), []).append((g[task_at], [x[s] for s in seeds], [y[s] for s in seeds]))
    for row, p in zip(comparisons, holm([c["p_t"] for c in comparisons]), strict=True):
        row["p_holm"] = p
    if all(len(groups[g]) == 1 for g in keys) and len(keys) > 1:
        notes.append("every group holds a single run: no spread, no test. Ablations need replicates: a grid "
                     "over the factors and `seed`")
    notes += environment_notes(groups, keys, factors)
    agreement = _agreement(groups, keys, factors, notes)
    members = {label(factors, g): sorted(groups[g], key=lambda r: (r.seed, r.study, r.trial)) for g in keys}
    flags, warnings = run_flags(members, metric, value)
    tasks = across_tasks(group_rows, arms) if task_at is not None and len({g[task_at] for g in keys}) > 1 else None
    return {"groups": group_rows, "comparisons": comparisons, "agreement": agreement, "notes": notes,
            "metric_key": metric, "flags": flags, "warnings": warnings, "tasks": tasks, "options": dict(options),
            "members": members}


def environment_notes(groups: Mapping[tuple[str, ...], Sequence[Run]], keys: Sequence[tuple[str, ...]],
                      factors: Sequence[str]) -> list[str]:
    """A note when the runs ran in more than one environment (metrics.json ``environment``:
    :mod:`dora_lab.run.environment`), naming what differs and, for each group, what its runs had:
    the same config and seed can end elsewhere on another CPU or library version."""
    envs = {g: [r.metrics.get("environment") or {} for r in groups[g]] for g in keys}
    unknown = {g: sum(not e for e in envs[g]) for g in keys}
    notes = []
    if 0 < sum(unknown.values()) < sum(len(envs[g]) for g in keys):
        where = "; ".join(f"{label(factors, g)}: {unknown[g]} of {len(envs[g])}" for g in keys if unknown[g])
        notes.append(f"environment unknown for some runs ({where}): they ran before dora_lab recorded one, so "
                     f"whether they ran where the others did cannot be told, and the same config and seed can "
                     f"end at another value on another machine (docs/results.md)")
    differ = differences([e for g in keys for e in envs[g]])
    if not differ:
        return notes
    per_group = "; ".join(f"{label(factors, g)}: " + ", ".join(
        f"{k} {' / '.join(map(str, distinct(envs[g], k))) or 'not recorded'}" for k in differ) for g in keys)
    return [*notes, f"runs ran in more than one environment ({', '.join(differ)} differ): the same config and seed "
            f"can end at another value on another machine or library version (docs/results.md), so a "
            f"difference between groups run apart mixes the two. By group: {per_group}"]


def _agreement(groups: dict[tuple[str, ...], list[Run]], keys: Sequence[tuple[str, ...]],
               factors: Sequence[str], notes: list[str]) -> list[dict[str, Any]]:
    """Kendall tau and top-k overlap between groups that differ only in the scorer (same seed),
    and between seeds within each group (the baseline: how much a ranking moves by seed alone)."""
    if "scorer.name" not in factors:
        return []
    si = factors.index("scorer.name")
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i:]
             if all(x == y for j, (x, y) in enumerate(zip(a, b, strict=True)) if j != si)]
    rows = []
    for a, b in pairs:
        for ra in groups[a]:
            for rb in groups[b]:
                same = a == b
                if (ra.seed >= rb.seed if same else ra.seed != rb.seed) or not ra.scores or not rb.scores:
                    continue
                k = sum(ra.allocation.values())
                try:
                    rows.append({"group_a": label(factors, a), "group_b": label(factors, b), "kind":
                                 "seed vs seed" if same else "scorer vs scorer", "seed_a": ra.seed, "seed_b": rb.seed,
                                 "kendall_tau": kendall_tau(ra.scores, rb.scores),
                                 "top_k_overlap": top_k_overlap(ra.scores, rb.scores, k), "k": k,
                                 "components": sum(len(v) for v in ra.scores.values())})
                except ValueError as exc:
                    notes.append(f"agreement {label(factors, a)} seed {ra.seed} / {label(factors, b)} seed "
                                 f"{rb.seed}: {exc}")
    if not rows:
        notes.append("agreement between scorers: no pair of runs with recorded scores (scores.json)")
    return rows


def majority_notes(data: Mapping[str, Any], metric_key: str) -> list[str]:
    """Warnings for groups whose every run sat at the majority class (Matthews correlation <= 0: a
    constant prediction scores exactly 0; the same rule as the run's ``at_majority`` flag): they did
    not learn, and a comparison between such groups (p = 1.0) says nothing about the methods."""
    if not any(m in metric_key.lower() for m in _MCC):
        return []
    stuck = [g["group"] for g in data["groups"] if g["values"] and all(v <= 0 for v in g["values"])]
    if stuck and len(stuck) == len(data["groups"]):
        return [f"did not learn: every run sat at the majority class ({metric_key} <= 0 in all "
                f"{sum(len(g['values']) for g in data['groups'])} runs); the comparisons say nothing about the "
                "methods. Train longer, raise the learning rate or use more data."]
    return [f"did not learn: {g} (every run at the majority class, {metric_key} <= 0)" for g in stuck]


# -- the command --------------------------------------------------------------------------------
def drop_repeats(runs: Sequence[Run]) -> tuple[list[Run], list[dict[str, Any]]]:
    """Keep one run per (study, seed, configuration): a second COMPLETE run of the same point (a grid
    point two workers drew at once, before dora_lab deduplicated them) would count one seed twice.
    Runs are repeats only when their whole resolved configs agree (apart from paths and devices), so
    grouping by fewer factors than vary never drops a distinct run."""
    kept: dict[tuple[Any, ...], Run] = {}
    repeats: list[dict[str, Any]] = []
    for run in sorted(runs, key=lambda r: (r.study, r.trial)):
        point = tuple(sorted((k, fmt(v)) for k, v in run.config.items() if k not in NOT_FACTORS))
        key = (run.study, run.seed, point)
        if key in kept:
            repeats.append({"study": run.study, "trial": run.trial, "state": "COMPLETE",
                            "reason": f"repeats trial {kept[key].trial} (same configuration and seed); left out"})
        else:
            kept[key] = run
    return list(kept.values()), repeats


def _options(block: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The report block's power and planning keys, the command line's flags winning."""
    flags = {k: getattr(args, k) for k in ("min_effect", "half_width", "pilot_seeds", "max_seeds")}
    merged = {**block, **{k: v for k, v in flags.items() if v is not None}}
    return parse_report(merged, "the report block with the command line's flags").model_dump()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dora_lab.report",
                                     description="Ablation reports (Markdown, CSV, PNG) from finished studies.")
    parser.add_argument("study", nargs="+", help="study config(s) (studies/ablation_scorer.yaml) or study name(s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <output_dir>/report/<study>)")
    parser.add_argument("--reference", action="append", default=None, metavar="KEY=VALUE",
                        help="the reference group, e.g. scorer.name=magnitude (replaces report.reference)")
    parser.add_argument("--factors", nargs="+", default=None, metavar="KEY",
                        help="group by these keys (config keys or final_rank) instead of detecting them")
    parser.add_argument("--value", choices=("objective", "final"), default="objective",
                        help="objective: the trial's value (the study's objective); final: the last evaluation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for the study CLI (e.g. output_dir=...)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, when STUDY is a study name")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI, when STUDY is a study name")
    parser.add_argument("--experiment", default=None, help="MLflow experiment, when STUDY is a study name")
    parser.add_argument("--metric", default=None, help="the study's metric, when STUDY is a study name "
                        "(default: the MLflow parent run's optuna.metric tag)")
    parser.add_argument("--min-effect", type=float, default=None,
                        help="the difference worth detecting: seeds needed per comparison (report.min_effect)")
    parser.add_argument("--half-width", type=float, default=None,
                        help="plan the seeds from a pilot for a 95%% interval this narrow (report.half_width)")
    parser.add_argument("--pilot-seeds", type=int, default=None, help="pilot size (report.pilot_seeds, 3)")
    parser.add_argument("--max-seeds", type=int, default=None, help="cap on the planned seeds (report.max_seeds, 20)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not look up or log to MLflow")
    parser.add_argument("--trust-plugins", action="store_true", help="also run plugins that only a base: file or "
                        "an included config lists (by default only the named config's plugins run)")
    args = parser.parse_args(argv)
    try:
        sources = sources_of(args)
        for source in sources:  # a damaged optuna.db: one error naming it, not SQLAlchemy's traceback
            check_sqlite_store(source.storage, "optuna", "study.storage" if source.path else "--storage")
        first = sources[0]
        options = _options(first.report, args)  # its mistakes before any study is read
        reference = first.report.get("reference", {})
        if args.reference:
            reference = dict(parse_assignment(r, "--reference") for r in args.reference)
        loaded = [load_runs(source) for source in sources]
        archived, archive_notes = archived_runs(first, args.overrides, args.trust_plugins)
        runs = [r for rs, _, _ in loaded for r in rs] + archived
        skipped = [s for _, ss, _ in loaded for s in ss]
        searched = {k for _, _, ks in loaded for k in ks}
        if not runs:
            raise ConfigError(f"no COMPLETE trial in {', '.join(s.name for s in sources)}; nothing to report")
        factors = args.factors or first.report.get("factors") or detect_factors(runs, searched - {"seed"})
        runs, repeats = drop_repeats(runs)
        skipped = [*skipped, *repeats]
        derived, mixed = side_keys(runs, factors)
        for f in factors:
            if f not in DERIVED and not any(f in r.config for r in runs):
                raise ConfigError(f"report.factors: {f!r} is neither a config key of the runs nor one of {DERIVED}")
        parents = {s.name: ("--no-mlflow" if args.no_mlflow else mlflow_parent(s)) for s in sources}
        metric: str = first.metric or next((p[2]["optuna.metric"] for p in parents.values()
                                            if not isinstance(p, str) and p[2].get("optuna.metric")), "objective")
        if not reference and [f for f in factors if f != TASK]:  # every task has its own reference group
            arm_factors = [f for f in factors if f != TASK]
            first_group = min({tuple(r.factor(f) for f in arm_factors) for r in runs}, key=_sort_key)
            reference = dict(zip(arm_factors, first_group, strict=True))
        reference = reference or default_reference(runs, factors)
        key = metric if metric != "objective" else str(runs[0].metrics.get("metric", ""))
        data = build(runs, factors, reference, args.value, key, options)
        data["notes"] = [*majority_notes(data, key), *data["notes"], *archive_notes]
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = Path(runs[0].folder)  # <output_dir>/studies/<name>/trial-000
    root = first.output_dir or (folder.parents[2] if len(folder.parents) > 2 else Path.cwd())
    out = args.out or root / "report" / first.name
    command = report_command(list(argv if argv is not None else sys.argv[1:]))
    markdown = render(data, out, sources=sources, factors=factors, derived=derived, mixed=mixed, reference=reference,
                      skipped=skipped, metric=metric, value=args.value, parents=parents, command=command)
    page = write_html(markdown)
    links = log_to_mlflow(parents, out, {s.name: s.tracking_uri for s in sources})
    print(f"report: {markdown}\n        {page} (one file, its pictures embedded)")
    for name, link in links.items():
        print(f"        logged to the MLflow parent run of {name!r}: {link}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
