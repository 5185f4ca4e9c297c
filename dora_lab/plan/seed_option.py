"""The ``study.seeds`` option: a grid study that adds seeds until each comparison's interval is
narrow enough, or a cap is reached (Stein's two-stage rule, :mod:`dora_lab.track.seed_plan`)::

    study:
      sampler: grid
      space: {scorer.name: {type: categorical, choices: [magnitude, sensitivity]}}   # no seed here
      seeds: {pilot: 3, max: 10, half_width: 0.02, reference: {scorer.name: magnitude}}

The study runs seeds ``0 .. pilot-1`` of every arm (the grid over the other searched keys), plans
``N`` from the pilot's paired differences against the reference arm, then runs seeds
``pilot .. N-1`` of every arm (:mod:`dora_lab.study.seeds`).  This module is the option's schema
only (read by :mod:`dora_lab.plan.space`, no Optuna).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from ..run.config import _Strict

__all__ = ["SeedsOption"]


class SeedsOption(_Strict):
    """``study.seeds``: replicates planned from a pilot (a grid study; the seed is not in ``study.space``)."""

    key: Literal["seed"] = Field("seed", description="the config key numbering the replicates (the report pairs "
                                                     "runs by seed)")
    pilot: int = Field(3, ge=2, description="seeds 0 .. pilot-1 of every arm run first; their paired "
                                            "differences plan the rest")
    max: int = Field(10, ge=2, description="the cap on the seeds per arm (the report says when it binds)")
    half_width: float = Field(gt=0, description="the target half-width of each comparison's 95% interval of the "
                                                "paired difference, in the metric's units")
    reference: dict[str, Any] = Field(description="the reference arm: every other searched key -> its value "
                                                  "(e.g. {scorer.name: magnitude}); every other arm is compared "
                                                  "with it")
    _running: int = PrivateAttr(0)  # the seeds the grid holds now: the pilot, then the plan

    @model_validator(mode="after")
    def _check(self) -> SeedsOption:
        if self.max < self.pilot:
            raise ValueError(f"study.seeds.max ({self.max}) must be at least study.seeds.pilot ({self.pilot})")
        if any(isinstance(v, dict | list) for v in self.reference.values()):
            raise ValueError(f"study.seeds.reference maps each searched key to one value, got {self.reference}")
        self._running = self._running or self.pilot
        return self

    def check_space(self, grid: Mapping[str, Sequence[Any]]) -> None:
        """The grid's other keys make the arms: the seed is not one of them, and the reference names
        one of its values for every one of them."""
        if self.key in grid:
            raise ValueError(f"study.space.{self.key}: study.seeds runs seeds 0 .. N-1 itself (N planned from the "
                             f"pilot); drop {self.key} from study.space")
        if not grid:
            raise ValueError("study.seeds compares arms: search at least one key besides the seed (study.space)")
        missing, unknown = [k for k in grid if k not in self.reference], [k for k in self.reference if k not in grid]
        if missing or unknown:
            raise ValueError(f"study.seeds.reference must give one value for each searched key ({', '.join(grid)})"
                             + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; not searched: {', '.join(unknown)}" if unknown else ""))
        for key, value in self.reference.items():
            if value not in grid[key]:
                raise ValueError(f"study.seeds.reference.{key}: {value!r} is not one of study.space.{key}'s choices "
                                 f"{list(grid[key])}")

    def check_report(self, report: Any) -> None:
        """The report states the study's plan: a ``report:`` block may not set another target or reference."""
        block = report if isinstance(report, dict) else {}
        if block.get("half_width") is not None:
            raise ValueError(f"report.half_width ({block['half_width']}) and study.seeds both plan the seeds; the report "
                             "states study.seeds' plan: drop report.half_width (and report.pilot_seeds, max_seeds)")
        if block.get("reference") and dict(block["reference"]) != self.reference:
            raise ValueError(f"report.reference {block['reference']} differs from study.seeds.reference "
                             f"{self.reference}: the seeds are planned against the latter; make them equal")

    @property
    def running(self) -> int:
        """How many seeds (``0 .. running-1``) of every arm the grid holds now."""
        return self._running

    def hold(self, n: int) -> None:
        """Let the grid hold seeds ``0 .. n-1`` (the pilot, then the planned ``N``)."""
        self._running = n
