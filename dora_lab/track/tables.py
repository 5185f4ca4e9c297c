"""Tables out: CSV files and Markdown tables from rows (one dict per row).

One home for the study summary's ``trials.csv``/``trials.md`` (:mod:`dora_lab.track.tracker`), the
study's terminal summary and the report's tables (:mod:`dora_lab.report.io`).  The columns are
the rows' keys in first-seen order unless given.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["columns_of", "markdown_table", "write_csv", "write_table"]


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The rows as CSV (unrounded); a table without rows gets the header ``(empty)``."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns_of(rows) or ["(empty)"])
        writer.writeheader()
        writer.writerows(rows)


def write_table(rows: Sequence[Mapping[str, Any]], csv_path: Path, md_path: Path) -> None:
    """The rows as CSV and as a Markdown table."""
    write_csv(rows, csv_path)
    md_path.write_text(markdown_table(rows))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: list[str] | None = None, width: int = 0) -> str:
    """A Markdown table; ``width > 0`` cuts long cells (for the terminal)."""
    columns = columns or columns_of(rows)

    def cut(s: str) -> str:
        return s if not width or len(s) <= width else s[:width - 1] + "~"

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cut(_cell(r.get(c))) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
