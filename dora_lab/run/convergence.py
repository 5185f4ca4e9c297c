"""Has a run finished learning, and has it learned anything?  Two flags from its evaluations.

**Still rising** (:func:`still_rising`).  ``h_1 .. h_m`` are the main metric at the run's ``m``
evaluations (negated where lower is better, so higher is better), ``s_i`` their steps.  Judged from
``m >= 3`` evaluations on; the run is *still rising* when either

- (a) its last evaluation is its best and beats every earlier one by more than ``tol``:
  ``h_m - max(h_1 .. h_{m-1}) > tol``; or
- (b) over the last third of the evaluations (``w = max(3, ceil(m / 3))`` of them) the
  least-squares line of ``h`` against the step rises by more than ``tol`` across the window:
  ``slope * (s_m - s_{m-w+1}) > tol``,

with ``tol = max(0.005, 0.01 * |max h|)`` (half a point of MCC or accuracy; 1% of a perplexity).
A flag asks for a look at the curve (and for longer training): evaluation noise of the order of
``tol`` can raise it on a plateau, and a run that rises slower than ``tol`` per third is not flagged.

**At the majority class** (:func:`at_chance`): the value is no better than predicting the
majority class of the evaluation split for every row: Matthews correlation ``<= 0`` (a constant
prediction scores exactly 0), or accuracy ``<= `` the majority class's share of the split (``+ 1e-9``).
Other metrics are not judged (None).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ABS_TOL", "REL_TOL", "at_chance", "checks", "eval_labels", "majority_share", "still_rising"]

ABS_TOL = 0.005
REL_TOL = 0.01
EPS = 1e-9


def _tolerance(values: Sequence[float]) -> float:
    return max(ABS_TOL, REL_TOL * abs(max(values)))


def still_rising(values: Sequence[float], steps: Sequence[float] | None = None,
                 greater_is_better: bool = True) -> dict[str, Any]:
    """The rule of the module docstring on one run's metric values (in evaluation order):
    ``{"still_rising": bool or None (fewer than 3 evaluations), "last_gain", "fitted_rise",
    "window", "tolerance"}``."""
    at = [float(x) for x in steps] if steps is not None else [float(i) for i in range(len(values))]
    if len(at) != len(values):
        raise ValueError(f"still_rising: {len(values)} values but {len(at)} steps")
    kept = [(x, float(v) if greater_is_better else -float(v)) for x, v in zip(at, values, strict=True)
            if math.isfinite(float(v))]  # an undefined evaluation (NaN) is left out
    s, h = [x for x, _ in kept], [v for _, v in kept]
    if len(h) < 3:
        return {"still_rising": None, "last_gain": math.nan, "fitted_rise": math.nan, "window": len(h),
                "tolerance": math.nan}
    tol = _tolerance(h)
    w = max(3, math.ceil(len(h) / 3))
    x, y = np.array(s[-w:]), np.array(h[-w:])
    slope = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else 0.0
    rise = slope * float(x[-1] - x[0])
    gain = h[-1] - max(h[:-1])
    return {"still_rising": bool(gain > tol or rise > tol), "last_gain": gain, "fitted_rise": rise, "window": w,
            "tolerance": tol}


def majority_share(labels: Sequence[Any]) -> float | None:
    """The share of the most frequent label (None for no labels)."""
    counts = Counter(labels)
    return max(counts.values()) / len(labels) if labels else None


def at_chance(value: float, metric: str, majority: float | None = None) -> bool | None:
    """Is ``value`` of ``metric`` no better than the majority-class predictor?  None: cannot say
    (another metric, or accuracy without the split's majority share)."""
    name = metric.rsplit("/", 1)[-1]
    if math.isnan(value):
        return None
    if name == "matthews_correlation":
        return value <= EPS
    if name == "accuracy" and majority is not None:
        return value <= majority + EPS
    return None


def checks(history: Sequence[Mapping[str, float]], metric: str, greater_is_better: bool,
           majority: float | None) -> dict[str, Any]:
    """What a run's ``metrics.json`` says under ``"checks"``: the still-rising rule on ``metric`` over
    ``history`` and whether the last evaluation is at the majority class."""
    values = [float(h[metric]) for h in history if metric in h]
    steps = [float(h.get("step", i)) for i, h in enumerate(history) if metric in h]
    out = still_rising(values, steps, greater_is_better)
    out["majority_share"] = majority
    out["at_majority"] = at_chance(values[-1], metric, majority) if values else None
    if "accuracy" in (history[-1] if history else {}) and metric != "accuracy" and majority is not None:
        out["accuracy_at_majority"] = at_chance(float(history[-1]["accuracy"]), "accuracy", majority)
    return out


def eval_labels(encoded: Any, rows: dict[str, list[dict[str, Any]]] | None, split: str) -> list[Any]:
    """The gold labels of an evaluation split: a classifier's from its token rows, a prompt task's from
    its data rows (not at hand when a study's token cache served them: then none, and the majority-class
    check reads MCC alone)."""
    if encoded.causal is None:
        return list(encoded.labels)
    return [r["label"] for r in (rows or {}).get(split, []) if "label" in r]
