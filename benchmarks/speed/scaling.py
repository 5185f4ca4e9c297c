"""The magnitude scorer alone, its closed form against the paper's naive form that materialises
each component's ``d_out x d_in`` update, over several start ranks on one transformer block's
linears, with least-squares fits of the time against both cost models (``r0^2 (d_in + d_out)``
and ``r0 d_in d_out``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from dora_lab import RankOneLinear
from dora_lab.metrics.magnitude import magnitude

from .device import synchronizer


# -- magnitude scorer: closed form against the naive, materialising form -----------------------------
def naive_magnitude(layer: RankOneLinear) -> torch.Tensor:
    """The paper's code: form every component's ``d_out x d_in`` update and the layer's to get norms."""
    with torch.no_grad():
        a, b, c = layer.A.float(), layer.B.float(), layer.effective_c().float()
        total = torch.linalg.matrix_norm((b * c) @ a)
        share = torch.stack([torch.linalg.matrix_norm(c[i] * torch.outer(b[:, i], a[i])) for i in range(layer.rank)])
        return share / (total + 1e-8)


def _score_all(fn: Callable[[RankOneLinear], torch.Tensor], layers: Sequence[RankOneLinear]) -> None:
    for layer in layers:
        fn(layer)


def _time_call(fn: Callable[[], object], min_seconds: float, max_repeats: int,
               sync: Callable[[], None] = lambda: None) -> float:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def magnitude_scaling(shapes: Sequence[tuple[int, int]], ranks: Sequence[int], naive_max_rank: int,
                      min_seconds: float, device: torch.device | None = None) -> dict[str, Any]:
    """Time the magnitude scorer over one transformer block's linears (``shapes`` = (d_in, d_out)) on
    ``device`` (default the CPU)."""
    device = device or torch.device("cpu")
    sync = synchronizer(device)
    bases = {s: nn.Linear(*s, device=device) for s in set(shapes)}
    rows = []
    for r in ranks:
        torch.manual_seed(r)
        layers = [RankOneLinear(bases[s], r0=r, dropout=0.0) for s in shapes]
        with torch.no_grad():
            for layer in layers:
                layer.c.normal_()
        row: dict[str, Any] = {
            "r0": r,
            "work_closed_form": sum(r * r * (d_in + d_out) for d_in, d_out in shapes),
            "work_naive": sum(r * d_in * d_out for d_in, d_out in shapes),
            "closed_form_ms": _time_call(partial(_score_all, magnitude, layers), min_seconds, 200, sync),
        }
        if r <= naive_max_rank:
            row["naive_ms"] = _time_call(partial(_score_all, naive_magnitude, layers), min_seconds, 20, sync)
            row["max_abs_diff"] = max(float((magnitude(la) - naive_magnitude(la)).abs().max()) for la in layers)
        rows.append(row)
    return {"shapes": [list(s) for s in shapes], "rows": rows, "fits": _fits(rows)}


def _fits(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares ``t = a + b * work`` for both cost models and both methods (R^2 of each), and
    the log-log slope of time against r0 over the two largest ranks measured."""
    out: dict[str, Any] = {}
    for method in ("closed_form", "naive"):
        pts = [row for row in rows if f"{method}_ms" in row]
        if len(pts) < 3:
            continue
        t = [row[f"{method}_ms"] for row in pts]
        out[method] = {
            "r2_vs_r0sq_din_plus_dout": _r2([row["work_closed_form"] for row in pts], t),
            "r2_vs_r0_din_dout": _r2([row["work_naive"] for row in pts], t),
            "loglog_slope_top": math.log(t[-1] / t[-2]) / math.log(pts[-1]["r0"] / pts[-2]["r0"]),
        }
    return out


def _r2(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    slope = sxy / sxx if sxx else 0.0
    ss_res = sum((b - (my + slope * (a - mx))) ** 2 for a, b in zip(x, y, strict=True))
    ss_tot = sum((b - my) ** 2 for b in y)
    return 1.0 - ss_res / ss_tot if ss_tot else 1.0
