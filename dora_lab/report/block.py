"""The ``report:`` block's schema, re-exported from its home below study and report,
:mod:`dora_lab.plan.report_block`, so that ``from dora_lab.report.block import parse_report`` keeps working."""

from ..plan.report_block import ReportConfig, parse_report, with_study_seeds

__all__ = ["ReportConfig", "parse_report", "with_study_seeds"]
