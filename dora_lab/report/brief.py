"""The answer so far, where MLflow opens: the study's parent run and experiment descriptions.

MLflow renders a run's and an experiment's description (the tag ``mlflow.note.content``) as Markdown
at the top of the run's page and of the experiment's.  So the study's parent run (and its experiment)
carry the short form of the report (:func:`answer_markdown`): the per-group table (n, mean, sd, 95%
t-interval, numbers to 4 decimals), the paired comparisons against the reference (Holm-adjusted),
the best trial with its link, the link to ``report.html`` once the report is made, a warning where
runs did not learn; and the parent gets ``allocations.png`` (:data:`ALLOCATIONS`): every complete
trial's final rank allocation side by side, one heatmap per trial on one colour scale, since
MLflow's compare page shows them only as thumbnails.  Links in the description are relative to the
page (``#/experiments/...``; MLflow opens them in a new tab), so they hold on any host and port.  The study runner calls :func:`post_answer`
after every trial and at the end; the numbers are :func:`dora_lab.report.compare.build`'s, the
full report's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..run.config_yaml import ConfigError, apply_overrides, read_yaml
from ..track.links import run_url
from ..track.tables import markdown_table
from .archive import archived_runs
from .compare import build, default_reference, detect_factors, drop_repeats, majority_notes
from .io import Run, Source, load_runs, source_from_config
from .plots import allocation_panels
from .text import fmt_ci as _ci
from .text import fmt_num as _num
from .text import fmt_p as _p

__all__ = ["ALLOCATIONS", "DESCRIPTION_TAG", "MAX_DESCRIPTION", "answer_markdown", "included_runs", "post_answer"]

DESCRIPTION_TAG = "mlflow.note.content"  # a run's or experiment's description, rendered as Markdown
ALLOCATIONS = "allocations.png"  # on the parent run: every complete trial's allocation side by side
MAX_DESCRIPTION = 7900  # MLflow's tag values hold 8000 characters


def _best(runs: Sequence[Run], maximize: bool) -> Run | None:
    ok = [r for r in runs if r.value == r.value]
    return (max if maximize else min)(ok, key=lambda r: r.value) if ok else None


def answer_markdown(source: Source, data: Mapping[str, Any], reference: Mapping[str, Any],
                    links: Mapping[str, str], n_trials: int, maximize: bool = True, reported: bool = False) -> str:
    """The description: groups, comparisons, best trial, links (``links``: ``report``, ``allocations``,
    ``best`` where known), warnings; at most :data:`MAX_DESCRIPTION` characters."""
    runs = [r for members in data["members"].values() for r in members]
    metric = source.metric or "objective"
    report = (f"[report.html]({links['report']}) (the full report: plots, agreement, notes)" if "report" in links
              else "report.html comes when the study ends" if reported
              else "`python -m dora_lab.report CONFIG` makes one (the config has no report: block)")
    md = [f"### {source.name}: the answer so far", "",
          f"{len(runs)} complete run(s) of {n_trials} trial(s); value: **{metric}** "
          f"({'higher' if maximize else 'lower'} is better). Full report: {report}.", ""]
    md += ["**Per group** (mean, sample sd, 95% t-interval of the mean):", "",
           markdown_table([{"group": g["group"], "n": g["n"], "mean": _num(g["mean"]), "sd": _num(g["sd"]),
                            "95% CI": _ci(g["ci_low"], g["ci_high"]),
                            "adapter params": _num(g["adapter_parameters_final"], 0),
                            "min/run": _num(g["minutes"], 2)} for g in data["groups"]])]
    if data["comparisons"]:
        ref = ", ".join(f"{k} = {v}" for k, v in reference.items())
        md += [f"**Paired by seed against the reference** ({ref}; difference = group - reference):", "",
               markdown_table([{"group": c["group"], "pairs": c["n"], "mean diff": _num(c["mean_diff"]),
                                "95% CI": _ci(c["ci_low"], c["ci_high"]), "p (paired t)": _p(c["p_t"]),
                                "p (Holm)": _p(c["p_holm"])} for c in data["comparisons"]])]
    else:
        md += ["No paired comparison yet (it needs two groups with a seed in common).", ""]
    md += [f"> **Warning: {note}**\n" for note in majority_notes(data, str(data.get("metric_key") or metric))]
    best = _best(runs, maximize)
    if best is not None:
        name = f"[trial {best.trial}]({links['best']})" if "best" in links else f"trial {best.trial}"
        md += [f"**Best trial:** {name}, {metric} = {_num(best.value)}.", ""]
    if "allocations" in links:
        md += [f"Every trial's final allocation side by side: [{ALLOCATIONS}]({links['allocations']}).", ""]
    text = "\n".join(md)
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION - 40] + "\n\n(cut: see report.html)"


def _allocations(members: Mapping[str, Sequence[Run]], path: Path) -> Path | None:
    """One heatmap per complete trial (group by group, seed by seed), titled with its group, seed and
    trial number, on one colour scale: 0 to the largest start rank ``adapter.r0``."""
    panels = [(f"{group} · seed {r.seed} (t{r.trial})", {k: float(v) for k, v in r.allocation.items()})
              for group, runs in members.items() for r in runs if r.allocation]
    if not panels:
        return None
    top = max(float(r.config.get("adapter.r0", 0) or 0) for runs in members.values() for r in runs) or None
    return allocation_panels(panels, path, vmax=top, per_row=min(4, max(2, math.ceil(math.sqrt(len(panels))))),
                             label="final rank")


def _link(url: str) -> str:
    return url.lstrip("/")


def included_runs(source: Source, overrides: Sequence[str] = ()) -> list[Run]:
    """The complete runs of the studies ``report.include`` pools in (the reference arm is often a study
    of its own, e.g. plain LoRA), those that exist already, read as the report reads them (``overrides``:
    the study's ``--set``s), and those ``report.archives`` reads back.  A study not run yet is left out, and so is a config that lists plugins:
    their code runs only in the report, named on its command line (``--trust-plugins``)."""
    runs: list[Run] = []
    for item in source.report.get("include") or []:
        try:
            if str(item).endswith((".yaml", ".yml")):
                path = source.path.parent / item if source.path else Path(item)
                if apply_overrides(read_yaml(path), overrides).get("plugins"):
                    continue
                other = source_from_config(path, overrides)
            else:
                other = Source(name=str(item), storage=source.storage, tracking_uri=source.tracking_uri,
                               experiment=str(item), output_dir=source.output_dir, metric=source.metric)
            runs += load_runs(other)[0]
        except (ConfigError, KeyError, OSError, ValueError):  # not run yet (or not readable): answer without it
            continue
    with contextlib.suppress(ConfigError, KeyError, OSError, ValueError):  # the report names the problem
        runs += archived_runs(source, overrides)[0]
    return runs


def post_answer(source: Source, client: Any, experiment_id: str, parent_id: str, folder: Path,
                maximize: bool = True, reported: bool = False, overrides: Sequence[str] = ()) -> str | None:
    """Compute the answer from the study's storage and run folders, and those of the studies its
    ``report.include`` names (:func:`included_runs`), and post it: the description of the parent run
    and of the experiment, and ``allocations.png`` on the parent.  Returns the Markdown (None: no
    complete trial yet).  ``reported``: the study makes its report at the end (its config has a
    ``report:`` block).  A ``report.reference`` no run has yet (its study not run) gives way to the
    default reference until it has."""
    runs, skipped, searched = load_runs(source)
    if not runs:
        return None
    runs, _ = drop_repeats([*runs, *included_runs(source, overrides)])
    factors = source.report.get("factors") or detect_factors(runs, searched - {"seed"})
    metric_key = str(runs[0].metrics.get("metric", "")) if not source.metric or source.metric == "objective" \
        else source.metric
    reference = source.report.get("reference") or default_reference(runs, factors)
    try:
        data = build(runs, factors, reference, "objective", metric_key)
    except ConfigError:
        if not source.report.get("reference"):
            raise
        reference = default_reference(runs, factors)
        data = build(runs, factors, reference, "objective", metric_key)
    ui = ""  # links relative to the page ("#/experiments/..."): right whatever host and port the UI runs on
    links = {}
    tags = client.get_run(parent_id).data.tags
    if tags.get("dora_lab.report_html"):
        links["report"] = _link(run_url(ui, experiment_id, parent_id, tags["dora_lab.report_html"]))
    best = _best(runs, maximize)
    if best is not None and best.mlflow_run_id:
        links["best"] = _link(run_url(ui, experiment_id, best.mlflow_run_id))
    figure = _allocations(data["members"], folder / ALLOCATIONS)
    if figure is not None:
        client.log_artifact(parent_id, str(figure))
        links["allocations"] = _link(run_url(ui, experiment_id, parent_id, ALLOCATIONS))
    text = answer_markdown(source, data, reference, links, len(runs) + len(skipped), maximize, reported)
    client.set_tag(parent_id, DESCRIPTION_TAG, text)
    client.set_experiment_tag(experiment_id, DESCRIPTION_TAG, text)
    return text
