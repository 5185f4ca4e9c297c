"""Numbers as the report's Markdown writes them (every number is also in a CSV, unrounded)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fmt_ci", "fmt_int", "fmt_num", "fmt_p"]


def fmt_num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def fmt_p(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    return "< 0.0001" if v < 1e-4 else f"{v:.4f}"


def fmt_int(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:,.0f}"


def fmt_ci(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else f"[{low:.4f}, {high:.4f}]"
