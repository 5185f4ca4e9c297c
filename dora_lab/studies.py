"""The study command, ``python -m dora_lab.study CONFIG`` (or ``dora-lab study``): the study runner
(:mod:`dora_lab.study.runner`) with the report wired in, its answer in MLflow after every trial and
the report of a config's ``report:`` block at its end (:mod:`dora_lab.report.study_end`).

The runner and the report stand side by side, neither imports the other (docs/architecture.md);
this entry point stands above both and joins them.  The report is imported when first used, as the
runner did before, so a study refused for bad input does not load it.  A library caller that wants
the same calls ``run_study(setup, workers, REPORTING)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .plan.setup import StudySetup
from .study.runner import Reporting
from .study.runner import main as runner_main
from .track.tracker import StudyTracker

__all__ = ["REPORTING", "main"]


def _answer(setup: StudySetup, tracker: StudyTracker, folder: Path) -> None:
    from .report.study_end import answer

    answer(setup, tracker, folder)


def _report(setup: StudySetup) -> int | None:
    from .report.study_end import make_report

    return make_report(setup)


#: the study's answer after every trial and its report at the end
REPORTING = Reporting(answer=_answer, report=_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dora_lab.study ARGS``: the study, then its report; the runner's exit codes."""
    return runner_main(argv, reporting=REPORTING)
