"""The ``report:`` block of a study config, read by ``python -m dora_lab.report`` (not by the study
runner): its keys, their defaults and checks, and one clear error per bad value."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from ..run.config import _Strict
from ..run.config_yaml import ConfigError

__all__ = ["Archive", "ReportConfig", "parse_report", "with_study_seeds"]


class Archive(_Strict):
    """Runs of a study whose Optuna and run folders are gone, read back from a committed report: the
    study config that made them and the report folder whose ``runs.csv`` (and ``flags.csv``) hold them."""

    study: str = Field(description="the study config that made the runs (relative to this file)")
    report: str = Field(description="the report folder with their runs.csv (relative to this file)")


class ReportConfig(_Strict):
    """The ``report:`` block: how ``python -m dora_lab.report`` compares a study's groups (``null``
    for any key: its default)."""

    reference: dict[str, Any] = Field(default_factory=dict, description="config key -> the reference group's value")
    factors: list[str] = Field(default_factory=list, description="the keys that make a group (default: detected)")
    include: list[str] = Field(default_factory=list, description="more study configs pooled into this report")
    archives: list[Archive] = Field(default_factory=list, description="runs of studies no longer in any store, read "
                                    "back from a committed report: [{study: the config that made them, report: the "
                                    "report folder with their runs.csv}], paths relative to this file")
    min_effect: float | None = Field(None, gt=0, description="the difference worth detecting, in the metric's "
                                     "units: the seeds each comparison needs to detect it")
    power: float = Field(0.8, gt=0.05, lt=1, description="for the minimum detectable difference and seeds needed")
    half_width: float | None = Field(None, gt=0, description="plan the seeds from a pilot (Stein's rule) for a "
                                     "95% interval of the paired difference at most this wide on each side")
    pilot_seeds: int = Field(3, ge=2, description="the pilot: the smallest this many common seeds")
    max_seeds: int = Field(20, ge=2, description="the cap on the planned seeds")
    common_seeds: bool = Field(False, description="one planned n for every comparison, the largest of their plans "
                               "(a study.seeds study sets this and the three keys above from its own)")

    @model_validator(mode="after")
    def _cap_holds_the_pilot(self) -> ReportConfig:
        if self.max_seeds < self.pilot_seeds:
            raise ValueError(f"report.max_seeds ({self.max_seeds}) must be at least report.pilot_seeds "
                             f"({self.pilot_seeds})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("reference")
    @classmethod
    def _one_value_each(cls, value: dict[str, Any]) -> dict[str, Any]:
        if any(isinstance(v, dict | list) for v in value.values()):
            raise ValueError("one value each")
        return value


def parse_report(block: Any, where: str) -> ReportConfig:
    """Validate a ``report:`` block (``None``: the defaults); errors name ``where`` (the file)."""
    if block is None:
        return ReportConfig()
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: report must be a mapping, got {type(block).__name__}")
    try:
        return ReportConfig.model_validate(block)
    except ValidationError as exc:
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = str(err["loc"][0]) if err["loc"] else ""
    if key == "archives":
        what = (f"{'.'.join(map(str, err['loc']))}: {str(err['msg']).removeprefix('Value error, ')}"
                if isinstance(block[key], list) else f"got {block[key]!r}")
        raise ConfigError(f"{where}: report.archives must be a list of {{study: STUDY.yaml, report: REPORT_FOLDER}} "
                          f"(the study config that made the runs, the report folder holding their runs.csv); {what}")
    if err["type"] == "extra_forbidden":
        raise ConfigError(f"{where}: report.{key}: unknown key; allowed: {', '.join(ReportConfig.model_fields)}")
    if key == "reference":
        raise ConfigError(f"{where}: report.reference must map config keys to one value each, e.g. "
                          f"{{scorer.name: magnitude}}; got {block[key]!r}")
    if key in ("factors", "include"):
        raise ConfigError(f"{where}: report.{key} must be a list of strings, got {block[key]!r}")
    msg = str(err["msg"]).removeprefix("Value error, ")
    got = f"; got {block[key]!r}" if key in block else ""
    raise ConfigError(f"{where}: report.{key or '(block)'}: {msg}{got}")


def with_study_seeds(report: dict[str, Any], seeds: Any) -> dict[str, Any]:
    """The report of a ``study.seeds`` study (``seeds``: its option) states the plan the study ran: its
    pilot, cap, target half-width and reference, one ``n`` for every comparison (``prepare`` refused
    a report block that sets another half-width or reference)."""
    if seeds is None:
        return report
    return {**report, "half_width": seeds.half_width, "pilot_seeds": seeds.pilot, "max_seeds": seeds.max,
            "common_seeds": True, "reference": report.get("reference") or dict(seeds.reference)}
