"""The study's summary on the terminal (:func:`print_summary`): its trials, the best one, and the
links to see it in MLflow (:func:`dora_lab.track.links.ui_lines`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import optuna
from mlflow.exceptions import MlflowException

from ..plan.setup import StudySetup
from ..track import front
from ..track.links import ui_lines
from ..track.tables import markdown_table
from ..track.tracker import StudyTracker

__all__ = ["print_summary"]


def print_summary(setup: StudySetup, study: optuna.Study, rows: list[dict[str, Any]], folder: Path,
                  tracker: StudyTracker | None = None) -> None:
    """The study's summary on the terminal: the trials (``rows`` from :meth:`StudyTracker.summarize`),
    the best one, where the summary ``folder`` is and how to open the MLflow UI on the study (with
    ``tracker``: the link to its runs table and to the compare page of its complete trials)."""
    keys = list(setup.study.space)
    multi = ["pareto", "adapter_params"] if front.is_multi_study(study) else []
    columns = ["trial", "state", "value", *multi[:1], *keys, "components", *multi[1:], "minutes", "reason"]
    short = [{c: r.get(c) for c in columns} for r in rows]
    print(f"\nstudy {setup.name!r} ({', '.join(f'{d} {m}' for m, d in setup.goals)}): {len(rows)} trial(s)")
    print(markdown_table(short, columns, width=48))
    for line in front.front_lines(study, setup.goals):
        print(line)
    print(f"summary (table, plots): {folder}")
    if tracker is not None:
        ids = [str(r["mlflow_run_id"]) for r in rows if r["state"] == "COMPLETE" and r["mlflow_run_id"]]
        report = None
        if tracker.parent_id:  # the report's file on the parent run, once the study's report is made
            with contextlib.suppress(MlflowException):
                report = tracker.client.get_run(tracker.parent_id).data.tags.get("dora_lab.report_html")
        print("\n".join(ui_lines(setup.tracking_uri, tracker, setup.study.direction == "maximize", ids, report)))


