"""The checks every data source shares: a source's rows, renamed by ``task.columns``, checked
against the task's columns and labels and normalised to ``{text fields..., label, idx}``.

:mod:`dora_lab.run.data` (local files, the entry point :func:`~dora_lab.run.data.load_splits`) and
:mod:`dora_lab.run.hub_data` (the Hub and ``task.dataset``, through ``datasets``) both end here, so
a bad row fails the same way, with a message that names the source, the row and what to fix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from .causal import chat_messages
from .tasks import LABEL_COLUMN, TaskSpec

__all__ = ["DataError", "Row", "check_columns", "normalise", "parse_label", "renamed", "subset"]

Row = dict[str, Any]


class DataError(ValueError):
    """The data cannot be loaded or is malformed; the message says what to set or fix."""


def renamed(rows: list[Row], renames: dict[str, str]) -> list[Row]:
    if not renames:
        return rows
    return [{renames.get(k, k): v for k, v in row.items()} for row in rows]


def check_columns(spec: TaskSpec, columns: Sequence[str], where: str, *, tsv: bool = False) -> None:
    missing = [c for c in spec.columns if c not in columns]
    if missing:
        glue = f", or GLUE's {', '.join(spec.glue_headerless)}" if spec.glue_headerless else ""
        hint = (
            f" (a TSV file without a header row must hold exactly {', '.join(spec.columns)}, in that order{glue})"
            if tsv
            else ""
        )
        raise DataError(
            f"{where} has no column {missing[0]!r}, which {spec.name} needs "
            f"(it needs {', '.join(spec.columns)}); columns present: {', '.join(columns) or '(none)'}. "
            f"Rename the column in the file{hint}, map it with task.columns ({{<its name>: {missing[0]}}}), "
            f"or set task.name to the task this data belongs to"
        )


def _label_rule(spec: TaskSpec) -> str:
    if spec.is_regression:
        if spec.label_range is None:
            return f"{spec.name} labels must be finite numbers"
        return f"{spec.name} labels must be numbers in [{spec.label_range[0]:g}, {spec.label_range[1]:g}]"
    ids = f"{spec.name} labels must be integers in [0, {spec.num_labels}) (0..{spec.num_labels - 1})"
    if spec.label_names:
        return f"{ids} or the names {', '.join(spec.label_names)} (in that order)"
    return ids


def parse_label(spec: TaskSpec, value: Any) -> int | float | None:
    """The label as int (classification) or float (regression), or None when it is invalid.
    A class name from ``spec.label_names`` (GLUE's ``entailment``...) is its index there."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str) and value.strip() in spec.label_names:
        return spec.label_names.index(value.strip())
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    if spec.is_regression:
        lo, hi = spec.label_range or (-math.inf, math.inf)
        return number if math.isfinite(number) and lo <= number <= hi else None
    if not number.is_integer() or not 0 <= number < spec.num_labels:
        return None
    return int(number)


def normalise(spec: TaskSpec, raw: list[Row], where: str, keep: Sequence[int] | None) -> list[Row]:
    """Checked rows ``{text fields..., label, idx}``; ``keep`` maps row positions to file rows."""
    if not raw:
        raise DataError(f"{where} has no rows")
    rows: list[Row] = []
    for position, src in enumerate(raw):
        number = (keep[position] if keep is not None else position) + 1
        row: Row = {}
        for field in spec.columns:
            if field not in src:
                present = ", ".join(src)
                raise DataError(f"{where} row {number} has no {field!r} (it has {present}); fix that row")
        for field in spec.text_fields:
            text = src[field]
            if spec.is_chat:  # a list of role/content turns, checked and copied
                try:
                    row[field] = chat_messages(text, src.get("system"))
                except ValueError as exc:
                    raise DataError(f"{where} row {number}: {exc}; fix that row") from None
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{where} row {number}: {field!r} must be text, got {text!r}; fix that row"
                )
            row[field] = text
        label = None if spec.is_instruction else parse_label(spec, src[LABEL_COLUMN])
        if label is None and not spec.is_instruction:
            hint = " (-1 marks GLUE's unlabelled test split: use train/validation)" if str(
                src[LABEL_COLUMN]
            ).strip() in {"-1", "-1.0"} else ""
            raise DataError(
                f"{where} row {number} has label {src[LABEL_COLUMN]!r}{hint}; {_label_rule(spec)}. "
                f"Fix the file, or set task.name to the task this data belongs to"
            )
        if not spec.is_instruction:
            row[LABEL_COLUMN] = label
        idx = src.get("idx")
        row["idx"] = int(idx) if isinstance(idx, int | str) and str(idx).strip().isdigit() else number - 1
        rows.append(row)
    return rows


def subset(n: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted positions of a seeded random subset of ``limit`` of ``n`` rows (None: keep all)."""
    if limit is None or limit >= n:
        return None
    return sorted(random.Random(seed).sample(range(n), limit))
