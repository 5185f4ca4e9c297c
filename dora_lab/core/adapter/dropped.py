"""Many "component i masked out" forwards in one: copies of a batch stacked, each missing one term.

A validation scorer such as ``alora`` needs the loss with each active component masked out in
turn: one forward per component.  On a CPU many small forwards cost several times what the same
rows cost stacked in one (MiniLM, 8-row batches, 16 copies: 3-4x, benchmarks/README.md).  Inside
:func:`dropped_per_copy`, a forward on ``len(drops)`` copies of a ``rows``-row batch, stacked along
the first dimension, gives copy ``k`` the output it would have with component ``drops[k] = (layer,
i)`` masked out: a forward hook subtracts that component's term ``x A[i]^T coef_i B[:, i]`` (the
layer's own ``coef = c_eff * alpha / r0``, eval mode: no dropout) from copy ``k``'s rows of the
layer's output.  The same numbers as masking, up to float rounding.

With ``alone_in`` (every adapter layer of the model) copy ``k`` keeps component ``drops[k]`` *alone*
instead: every layer's whole update ``x A^T diag(coef) B^T`` is subtracted from every copy, and
``drops[k]``'s term added back to copy ``k`` (ALoRA's "only r" loss, ``methods/alora.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .layer import RankOneLinear

__all__ = ["dropped_per_copy"]


@contextlib.contextmanager
def dropped_per_copy(drops: Sequence[tuple[RankOneLinear, int]], rows: int,
                     alone_in: Sequence[RankOneLinear] | None = None) -> Iterator[None]:
    """While active, copy ``k`` (rows ``k*rows`` to ``(k+1)*rows`` of a stacked batch) of every
    forward runs without component ``drops[k]`` (with ``alone_in``: with ``drops[k]`` as the only
    component of the whole model).  The layers must be in eval mode (no dropout)."""
    per_layer: dict[RankOneLinear, list[tuple[int, int]]] = {layer: [] for layer in alone_in or ()}
    for k, (layer, i) in enumerate(drops):
        per_layer.setdefault(layer, []).append((k, i))
    if any(layer.training for layer in per_layer):
        raise RuntimeError("dropped_per_copy needs the model in eval mode (dropout would differ per copy)")
    sign = 1.0 if alone_in is None else -1.0  # a drop's term is subtracted; a lone one added back

    def hook(picks: list[tuple[int, int]]) -> Any:
        def subtract(module: RankOneLinear, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            coef = module.effective_c() * module.scale
            out = out.clone()
            if alone_in is not None and module.rank:  # every copy: the base output alone
                a_all, b_all = module.A.to(x.dtype), (module.B * coef).to(x.dtype)
                out -= ((x @ a_all.T) @ b_all.T).to(out.dtype)
            for k, i in picks:
                part = slice(k * rows, (k + 1) * rows)
                a = module.A[i].to(x.dtype)
                b = (module.B[:, i] * coef[i]).to(out.dtype)
                out[part] -= sign * (x[part] @ a).unsqueeze(-1).to(out.dtype) * b
            return out
        return subtract

    handles = [layer.register_forward_hook(hook(picks)) for layer, picks in per_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
