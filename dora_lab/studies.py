"""The study command, ``python -m dora_lab.study CONFIG`` (or ``dora-lab study``): the study runner
(:mod:`dora_lab.study.runner`) with the report wired in, its answer in MLflow after every trial and
the report of a config's ``report:`` block at its end (:mod:`dora_lab.report.study_end`).

The runner and the report stand side by side, neither imports the other (docs/architecture.md);
this entry point stands above both and joins them.  A library caller that wants the same calls
``run_study(setup, workers, REPORTING)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .report.study_end import answer, make_report
from .study.runner import Reporting
from .study.runner import main as runner_main

__all__ = ["REPORTING", "main"]

#: the study's answer after every trial and its report at the end
REPORTING = Reporting(answer=answer, report=make_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dora_lab.study ARGS``: the study, then its report; the runner's exit codes."""
    return runner_main(argv, reporting=REPORTING)
