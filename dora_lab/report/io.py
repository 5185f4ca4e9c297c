"""A report's input and output: the studies, their run folders and the ``report:`` block in;
``report.md``, the CSV tables, the PNG pictures and the MLflow artifacts out.

:mod:`dora_lab.report.compare` computes; this module reads and writes.  Every number in ``report.md`` is
also in a CSV, unrounded.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import scipy
import yaml

from ..plan.report_block import parse_report, with_study_seeds
from ..run.config import flatten
from ..run.config_yaml import ConfigError, read_yaml
from ..track.links import safe_url
from ..track.tables import markdown_table, write_csv
from . import pareto, sections
from . import plots as report_plots
from .conclusions import metric_of
from .stats import Summary
from .text import fmt_num

__all__ = ["Run", "Source", "fmt", "load_runs", "log_to_mlflow", "mlflow_parent", "read_report_block", "render",
           "source_from_config"]


@dataclass
class Source:
    """Where one study lives."""

    name: str
    storage: str
    tracking_uri: str | None = None
    experiment: str = ""
    output_dir: Path | None = None
    metric: str | None = None  # what the trials' values measure (None: unknown, "objective")
    objective: str | None = None  # study.objective: best / final (None: unknown)
    report: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the config file, when given one


@dataclass
class Run:
    """One COMPLETE trial with its run folder's files (empty where the folder is gone)."""

    study: str
    trial: int
    seed: int
    value: float
    config: dict[str, Any]  # the flattened resolved config (the trial's params when no folder)
    metrics: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, int] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    minutes: float = math.nan
    mlflow_run_id: str = ""
    folder: str = ""
    front: bool | None = None  # on its multi-objective study's Pareto front (None: single-objective study)
    metric: str = ""  # what ``value`` measures: its own study's metric ("" unknown); tasks differ in a report
    params: dict[str, Any] = field(default_factory=dict)  # the trial's sampled values (Optuna's params)

    @property
    def components(self) -> int | None:
        """Active components at the end (allocation.json; an archived run's: its runs.csv)."""
        if self.allocation:
            return sum(self.allocation.values())
        return (self.metrics.get("archived") or {}).get("components")

    def factor(self, key: str) -> str:
        if key == "final_rank":
            return fmt(round(sum(self.allocation.values()) / len(self.allocation), 3)) if self.allocation else "?"
        return fmt(self.config.get(key))


def fmt(value: Any) -> str:
    """A factor value as text: 2.0 -> "2", None -> "null", lists as JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def report_command(args: Sequence[str], cwd: Path | None = None) -> str:
    """The shell command that makes this report again, as typed: ``cd`` to the folder it ran in (a
    config's relative ``output_dir`` and paths are read from there), then ``python -m dora_lab.report``
    with every argument (``--set`` overrides included), each quoted for the shell."""
    return f"cd {shlex.quote(str(cwd or Path.cwd()))} && {shlex.join(['python', '-m', 'dora_lab.report', *args])}"


# -- in: studies and run folders ----------------------------------------------------------------
def read_report_block(path: str | Path) -> dict[str, Any]:
    """The validated ``report:`` block of a config (following ``base:``), its defaults filled in."""
    return parse_report(read_yaml(path).get("report"), str(path)).model_dump()


def source_from_config(path: str | Path, overrides: Sequence[str] = ()) -> Source:
    """Resolve a study config exactly as the study CLI does (``--set`` included), plus its report block."""
    from ..plan.setup import prepare  # the study block without the runner (or Optuna)

    return source_of(prepare(path, overrides))


def source_of(setup: Any) -> Source:
    """Where the study of a resolved config is (``setup``: a :class:`dora_lab.plan.setup.StudySetup`,
    which the study runner holds already)."""
    return Source(name=setup.name, storage=setup.storage, tracking_uri=setup.tracking_uri,
                  experiment=setup.study.experiment or setup.name, output_dir=setup.output_dir,
                  report=with_study_seeds(parse_report(setup.data.get("report"), str(setup.config_path)).model_dump(),
                                          setup.study.seeds),
                  path=Path(setup.config_path), metric=setup.metric, objective=setup.study.objective)


def _read(folder: Path | None, name: str, trial: int | None = None) -> Any:
    """A run folder's file as data; ``{}`` when it is not there.  For ``trial`` (a COMPLETE trial,
    which wrote it) a missing file is named on stderr: its cells in the report read n/a."""
    if folder is None or not (folder / name).is_file():
        if folder is not None and trial is not None:
            print(f"note: trial {trial}'s {folder / name} is missing (moved or deleted?); its cells in the report "
                  f"read n/a", file=sys.stderr)
        return {}
    text = (folder / name).read_text()
    return yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)


def load_runs(source: Source) -> tuple[list[Run], list[dict[str, Any]], set[str]]:
    """(COMPLETE runs, the other trials with their reasons, the searched keys)."""
    from ..track.tracker import trial_minutes  # MLflow is imported only where it is needed

    if source.storage.startswith("sqlite:///") and not Path(source.storage.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no Optuna storage at {source.storage}; run the study first (or give --storage)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=source.name, storage=source.storage)
    except KeyError:
        names = optuna.get_all_study_names(source.storage)
        raise ConfigError(f"no study {source.name!r} in {source.storage}; it has: {', '.join(names) or 'none'}") \
            from None
    runs, skipped, searched = [], [], set()
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 else None
    for t in study.get_trials(deepcopy=False):
        searched |= set(t.params)
        if t.state != optuna.trial.TrialState.COMPLETE or not t.values:
            skipped.append({"study": source.name, "trial": t.number, "state": t.state.name,
                            "reason": t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason", "")})
            continue
        folder = Path(str(t.user_attrs["run_dir"])) if t.user_attrs.get("run_dir") else None
        config = flatten(_read(folder, "config.yaml", t.number)) or {**t.params}
        minutes = trial_minutes(t)
        metrics = _read(folder, "metrics.json", t.number)
        scores = _read(folder, "scores.json")
        own = source.metric if source.metric not in (None, "objective") else metrics.get("metric")
        runs.append(Run(study=source.name, trial=t.number, seed=int(config.get("seed", t.params.get("seed", 0))),
                        value=float(t.values[0]), config=config, metrics=metrics,
                        allocation=_read(folder, "allocation.json"), scores=scores.get("scores") or {},
                        budget=_read(folder, "budget.json"), minutes=math.nan if minutes is None else minutes,
                        mlflow_run_id=str(t.user_attrs.get("mlflow_run_id", "")), folder=str(folder or ""),
                        front=None if front is None else t.number in front, metric=str(own or ""),
                        params=dict(t.params)))
    return runs, skipped, searched


# -- out: the files ------------------------------------------------------------------------------
FILES = ("groups.csv", "comparisons.csv", "agreement.csv", "runs.csv", "flags.csv", "ranks.csv", "pooled.csv",
         "metric_by_group.png", "allocation.png",
         "budget.png")


def _pictures(data: Mapping[str, Any], out: Path, metric: str, references: set[str]) -> None:
    groups = data["groups"]
    labels = [g["group"] for g in groups]
    summaries = [Summary(g["n"], g["mean"], g["sd"], g["ci_low"], g["ci_high"], g["min"], g["max"]) for g in groups]
    report_plots.metric_by_group(labels, summaries, [g["values"] for g in groups], metric,
                                 out / "metric_by_group.png", references=references)
    panels, curves, r0 = [], [], 0.0
    for name in labels:
        runs = [r for r in data["members"][name] if r.allocation]
        if runs:
            layers = list(runs[0].allocation)
            panels.append((name, {k: sum(r.allocation.get(k, 0) for r in runs) / len(runs) for k in layers}))
            r0 = max([r0, *(float(r.config.get("adapter.r0", 0)) for r in runs)])
        with_budget = [r for r in data["members"][name] if r.budget.get("curve")]
        if with_budget:
            curves.append((name, str(with_budget[0].budget.get("unit", "?")), with_budget[0].budget["curve"]))
    report_plots.allocation_panels(panels, out / "allocation.png", vmax=r0 or None)
    report_plots.budget_curves(curves, out / "budget.png")


ENV_COLUMNS = ("device", "cpu_capability", "threads", "torch", "transformers", "python", "dora_lab", "commit")
"""runs.csv's columns from each run's metrics.json ``environment`` (empty for a run that has none): all
of :data:`dora_lab.run.environment.KEYS`, so a report read back (``report.archives``) has them all."""


def _write_tables(data: Mapping[str, Any], out: Path, metric: str, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The report's CSV tables, unrounded (groups, comparisons, agreement, runs, flags, ranks and pooled
    over tasks); returns the runs' rows, which the Markdown's Runs table shows rounded."""
    groups, comparisons, agreement = data["groups"], data["comparisons"], data["agreement"]
    group_of = {id(r): name for name, members in data["members"].items() for r in members}
    run_rows = [{"study": r.study, "trial": r.trial, "group": group_of[id(r)], "seed": r.seed, "value": r.value,
                 "final": (r.metrics.get("final") or {}).get(metric_of(r, data["metric_key"]), math.nan),
                 "components": r.components,
                 "adapter_parameters_final": r.metrics.get("adapter_parameters_final"),
                 "minutes": r.minutes, "mlflow_run_id": r.mlflow_run_id,
                 "params": json.dumps(r.params, sort_keys=True) if r.params else "",
                 **{k: (r.metrics.get("environment") or {}).get(k, "") for k in ENV_COLUMNS}} for r in runs]
    write_csv([{k: (" ".join(map(str, v)) if k == "values" else v) for k, v in g.items()} for g in groups],
         out / "groups.csv")
    write_csv(comparisons, out / "comparisons.csv")
    write_csv(agreement, out / "agreement.csv")
    write_csv(run_rows, out / "runs.csv")
    write_csv(data.get("flags") or [], out / "flags.csv")
    if data.get("tasks"):
        write_csv(data["tasks"]["ranks"], out / "ranks.csv")
        write_csv(data["tasks"]["pooled"], out / "pooled.csv")
    return run_rows


def render(data: Mapping[str, Any], out: Path, *, sources: Sequence[Any], factors: Sequence[str],
           derived: Sequence[str], mixed: Sequence[str], reference: Mapping[str, Any],
           skipped: Sequence[Mapping[str, Any]], metric: str, value: str, parents: Mapping[str, Any],
           command: str) -> Path:
    """Write the report's tables, pictures and report.md into ``out``; returns report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    groups, comparisons, agreement = data["groups"], data["comparisons"], data["agreement"]
    runs = [r for members in data["members"].values() for r in members]
    run_rows = _write_tables(data, out, metric, runs)
    _pictures(data, out, metric, {g["group"] for g in groups if g["is_reference"] and comparisons})
    objective = {"best": "the best validation evaluation once pruning had ended (`study.objective: best`)",
                 "final": "the last validation evaluation (`study.objective: final`)"}
    what = (f"each trial's value in the study: {objective.get(sources[0].objective or '', 'its objective')}"
            if value == "objective" else "the last validation evaluation of each run")
    seeds = sorted({r.seed for r in runs})
    study_list = ", ".join(f"`{s.name}` ({safe_url(s.storage)})" for s in sources)  # absolute: copyable
    md = [f"# Ablation report: {' + '.join(s.name for s in sources)}", "",
          f"Generated by `{command}` (scipy {scipy.__version__}, Python {platform.python_version()}).", "",
          f"**What is compared.** {len(runs)} complete runs from {study_list}, grouped by "
          f"{', '.join(f'`{f}`' for f in factors) or '(nothing varies)'} into {len(groups)} groups; seeds "
          f"{', '.join(map(str, seeds))}. The value is **{metric}**, {what}. "
          f"{len(skipped)} trial(s) are left out (not COMPLETE, or repeating a group and seed; listed under Notes).", ""]
    md += [f"> **Warning: {n}**\n" for n in data["notes"] if n.startswith(("did not learn", "runs ran in more", "environment unknown"))]
    if derived:
        keys = ", ".join(f"`{k}`" for k in derived)
        md += [f"Keys that also differ between runs but follow from the factors: {keys}.", ""]
    if mixed:
        md += [f"**Caution:** {', '.join(f'`{k}`' for k in mixed)} also differ *within* groups: each group pools "
               "runs that differ in them (name them in report.factors / --factors to split the groups).", ""]
    if "final_rank" in factors:
        md += ["`final_rank` is measured: the average active rank per adapted matrix at the end "
               "(allocation.json).", ""]
    md += sections.groups_section(data)
    md += sections.comparisons_section(data, reference, sources[0])
    md += [*sections.flags_section(data), *sections.tasks_section(data)]
    md += pareto.section(data, out, metric, factors)
    md += sections.agreement_section(agreement, factors)
    md += ["## Rank allocation", "", "![rank allocation](allocation.png)", "",
           "The final rank of every adapted matrix (layers x module types; allocation.json), averaged over each "
           "group's runs, on one colour scale from 0 to the start rank.", "",
           "## Budget schedules", "", "![budget curves](budget.png)", "",
           "The budget the schedule allowed at every optimizer step (budget.json), one run per group.", "",
           "## Runs", "",
           markdown_table([{"study": r["study"], "trial": r["trial"], "group": r["group"], "seed": r["seed"],
                            "value": fmt_num(r["value"]), "last eval": fmt_num(r["final"]),
                            "components": r["components"], "adapter params": r["adapter_parameters_final"],
                            "minutes": fmt_num(r["minutes"], 2), "MLflow run": r["mlflow_run_id"]} for r in run_rows]),
           "## Notes", ""]
    notes = [f"trial {s['trial']} of `{s['study']}`: {s['state']}" + (f" ({s['reason']})" if s["reason"] else "")
             for s in skipped] + list(data["notes"])
    for name, parent in parents.items():
        logged = f"these files are logged to the study's parent run {parent[1]} under report/" \
            if not isinstance(parent, str) else f"not logged ({parent})"
        notes.append(f"MLflow `{name}`: {logged}")
    tables = [*(f for f in FILES if f.endswith(".csv") and (out / f).is_file()),
              *(f for f in pareto.TABLES if (out / f).is_file())]
    md += [f"- {n}" for n in notes] + ["", "Tables (unrounded): " + ", ".join(tables), ""]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"


# -- MLflow -------------------------------------------------------------------------------------
def mlflow_parent(source: Any) -> tuple[Any, str, dict[str, str]] | str:
    """(client, the study's parent run id, its tags), or why there is none."""
    uri = source.tracking_uri
    if not uri:
        return "no MLflow tracking URI (give --tracking-uri)"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri}"
    try:
        from ..track.tracker import UID_TAG, StoreClient, find_parent_runs

        client = StoreClient(uri)
        exp = client.get_experiment_by_name(source.experiment or source.name)
        if exp is None:
            return f"no MLflow experiment {source.experiment or source.name!r} at {uri}"
        uid = optuna.load_study(study_name=source.name, storage=source.storage).user_attrs.get(UID_TAG)
        found = find_parent_runs(client, exp.experiment_id, source.name, uid, max_results=1)
    except Exception as exc:  # MLflow is optional: the report stands without it
        return f"MLflow at {uri} not reachable: {type(exc).__name__}: {exc}"
    if not found:
        return f"no parent run of study {source.name!r} in MLflow at {uri}"
    return client, str(found[0].info.run_id), dict(found[0].data.tags)


def log_to_mlflow(parents: Mapping[str, Any], out: Path, tracking_uris: Mapping[str, str | None] = {}  # noqa: B006
                  ) -> dict[str, str]:
    """Log the report's files (``report.md``, the self-contained ``report.html``, tables, pictures) to
    every study's parent run, under ``report/``; returns ``{study: link to the parent's report.html}``."""
    from ..track.links import run_url, ui_address

    links = {}
    for name, parent in parents.items():
        if not isinstance(parent, str):
            client, run_id, _ = parent
            client.log_artifacts(run_id, str(out), "report")
            client.set_tag(run_id, "dora_lab.report", "report/report.md")
            if (out / "report.html").is_file():
                client.set_tag(run_id, "dora_lab.report_html", "report/report.html")
            uri = tracking_uris.get(name) or client.tracking_uri
            links[name] = run_url(ui_address(uri), client.get_run(run_id).info.experiment_id, run_id,
                                  "report/report.html")
    return links
