"""The study's answer in MLflow, posted after trials at a pace that keeps its cost a small share of the
study's time (issue 27).

Posting the answer (:func:`dora_lab.report.study_end.answer`: every trial read back, the statistics,
the allocations figure drawn and logged) took a fifth to two fifths of a 16-step trial in the profile
(docs/throughput.md).  After a trial it is posted only when at least ``1 / share`` (20) times what the last
post took has passed since that post ended (the first trial's always is); the study's end posts it
whatever the pace (:func:`dora_lab.study.runner._run_and_summarize`), so the answer a finished or
stopped study leaves is complete.  Only MLflow's description and figure are paced: no trial, value or
file of a trial changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ANSWER_SHARE", "Paced"]

ANSWER_SHARE = 0.05  # at most about a twentieth of the study's time on its answer between trials


class Paced:
    """``post`` called at most at a pace where it costs about ``share`` of the time between calls:
    call the object after every trial."""

    def __init__(self, post: Callable[[], None], share: float = ANSWER_SHARE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.post, self.share, self.clock = post, share, clock
        self.cost: float | None = None  # what the last post took (None: none yet)
        self.ended = 0.0  # when it ended

    def due(self) -> bool:
        """Whether enough time has passed since the last post for its cost to be ``share`` of it."""
        return self.cost is None or self.cost <= self.share * (self.clock() - self.ended)

    def __call__(self) -> None:
        if not self.due():
            return
        started = self.clock()
        self.post()
        self.ended = self.clock()
        self.cost = self.ended - started
