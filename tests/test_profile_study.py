"""benchmarks/profile_study.py's timers: exclusive sections, charged to the part of the study they ran in."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from profile_study import Timer, fractions  # noqa: E402


def test_sections_are_exclusive_and_follow_the_parts() -> None:
    timer = Timer()
    inner = timer.wrap(lambda: time.sleep(0.5), "inner")

    def outer_body() -> None:
        time.sleep(0.05)
        inner()  # 0.5 s in "inner", not in "outer"
        timer.next_part("trial 0")  # the rest of "outer" falls in the new part
        time.sleep(0.3)

    timer.wrap(outer_body, "outer")()
    wall = timer.times["wall"]
    assert 0.05 <= wall["study start"]["outer"] < 0.4 <= 0.5 <= wall["study start"]["inner"]  # (lenient: a busy CPU)
    assert wall["trial 0"]["outer"] >= 0.3 and "inner" not in wall["trial 0"]
    assert timer.times["cpu"]["trial 0"]["outer"] < 0.1  # sleeping spends no CPU


def test_fractions_add_up_to_one() -> None:
    shares = fractions({"a": {"x": 3.0, "y": 1.0}, "b": {"x": 4.0}, "c": {"z": 100.0}}, ["a", "b"])
    assert shares == {"x": 0.875, "y": 0.125}
