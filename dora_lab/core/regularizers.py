"""Regularisers added to the task loss (docs/algorithms.md section 5), and their registry.

A regulariser is a function of the adapted layers returning a scalar tensor; the controller
multiplies it by its weight.  ``stops_when_frozen`` says whether it switches off once the final
mask is frozen (DEM does; AdaLoRA's orthogonal penalty does not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .adapter.layer import RankOneLinear
from .registry import Registry, RegistryError

__all__ = ["dem", "get_regularizer", "list_regularizers", "orthogonal", "register_regularizer"]

RegularizerFn = Callable[[Sequence[RankOneLinear]], torch.Tensor]


def _check(name: str, obj: object) -> None:
    if not callable(obj):
        raise RegistryError(f"regularizer {name!r} must be a function of the list of adapter layers")


REGULARIZERS: Registry[RegularizerFn] = Registry("regularizer", "dora_lab.regularizers", _check)


def register_regularizer(
    name: str, *, stops_when_frozen: bool = False, replace: bool = False
) -> Callable[[RegularizerFn], RegularizerFn]:
    def decorate(fn: RegularizerFn) -> RegularizerFn:
        fn.stops_when_frozen = stops_when_frozen  # type: ignore[attr-defined]
        REGULARIZERS.add(name, fn, replace=replace)
        return fn

    return decorate


def get_regularizer(name: str) -> RegularizerFn:
    return REGULARIZERS.get(name)


def list_regularizers() -> list[str]:
    return REGULARIZERS.names()


@register_regularizer("dem", stops_when_frozen=True)
def dem(layers: Sequence[RankOneLinear]) -> torch.Tensor:
    """DoRA's Dimensional Equilibrium Modulator:
    ``1 / (2 L r0) * sum_layers sum_i [Var(A[i,:]) + Var(B[:,i])]`` (unbiased variances)."""
    total = sum(
        (layer.A.var(dim=1).sum() + layer.B.var(dim=0).sum()) / layer.r0 for layer in layers
    )
    return torch.as_tensor(total) / (2 * len(layers))


@register_regularizer("orthogonal")
def orthogonal(layers: Sequence[RankOneLinear]) -> torch.Tensor:
    """AdaLoRA's: ``mean over layers of (||A A^T - I||_F + ||B^T B - I||_F) / 2``."""
    total = 0.0
    for layer in layers:
        eye = torch.eye(layer.rank, dtype=layer.A.dtype, device=layer.A.device)
        total = total + torch.linalg.matrix_norm(layer.A @ layer.A.T - eye)
        total = total + torch.linalg.matrix_norm(layer.B.T @ layer.B - eye)
    return torch.as_tensor(total) / (2 * len(layers))
