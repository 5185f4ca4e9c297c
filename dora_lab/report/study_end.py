"""What a study does with the report: its answer so far in MLflow after every trial, and the report
at its end.  The study runner does not import the report (they stand side by side,
docs/architecture.md); the study command (:mod:`dora_lab.studies`) hands these two functions to it
as a :class:`dora_lab.study.runner.Reporting`."""

from __future__ import annotations

import json
from pathlib import Path

from ..plan.setup import StudySetup
from ..track.tracker import StudyTracker
from .brief import post_answer
from .compare import main as report_main
from .io import report_command, source_of

__all__ = ["answer", "make_report"]


def answer(setup: StudySetup, tracker: StudyTracker, folder: Path) -> None:
    """Post the answer so far to the parent run's and the experiment's descriptions, and every
    trial's allocation side by side (:func:`dora_lab.report.brief.post_answer`); ``folder``: the
    study's summary folder.  The runner turns a failure into a note: it must never stop a study."""
    assert tracker.parent_id is not None  # the runner answers only once the parent run exists
    post_answer(source_of(setup), tracker.client, tracker.experiment_id, tracker.parent_id, folder,
                setup.study.direction == "maximize", reported=setup.data.get("report") is not None,
                overrides=setup.overrides)


def make_report(setup: StudySetup) -> int | None:
    """At the end of a study whose config has a ``report:`` block: ``python -m dora_lab.report`` on the
    same config and ``--set``s (report.md, the self-contained report.html, tables and pictures, logged
    to the parent run under ``report/``; it prints where).  A report that cannot be made (an
    ``include``d study not run yet, say) is a note, not a failed study.  Returns the report's exit
    code (``None``: no ``report:`` block)."""
    if setup.data.get("report") is None:
        return None
    args = [str(setup.config_path), *(x for s in setup.overrides for x in ("--set", s))]
    if setup.base.plugins and not any(s.startswith("plugins=") for s in setup.overrides):
        # the plugins this study ran (its base: chain's too) are the report's own: named, not trusted blindly
        args += ["--set", "plugins=" + json.dumps([str(p) for p in setup.base.plugins])]
    print(f"\nreport (the config's report: block): {report_command(args)}", flush=True)
    code = report_main(args)
    if code:
        print(f"note: no report (see above); once that is fixed: {report_command(args)}")
    return code
