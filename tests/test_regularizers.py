"""Regularisers: DEM and orthogonal against slow loop references, and DEM switched off once the
final mask is frozen."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import adamw, adapted_bert, batches, train
from torch import nn

from dora_lab import PruningController, RankOneLinear, get_regularizer, list_regularizers, make_scorer


def random_layers(r0: int = 3, seed: int = 0) -> list[RankOneLinear]:
    torch.manual_seed(seed)
    layers = [RankOneLinear(nn.Linear(d_in, d_out).double(), r0=r0) for d_in, d_out in ((5, 4), (7, 3), (4, 6))]
    with torch.no_grad():
        for layer in layers:
            layer.A.normal_()
            layer.B.normal_()
    return layers


def unbiased_variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def slow_dem(layers: list[RankOneLinear]) -> float:
    total = 0.0
    for layer in layers:
        a, b = layer.A.tolist(), layer.B.tolist()
        for i in range(layer.rank):
            total += unbiased_variance(a[i])  # the row A[i, :]
            total += unbiased_variance([b[j][i] for j in range(layer.out_features)])  # the column B[:, i]
    return total / (2 * len(layers) * layers[0].r0)


def frobenius(m: list[list[float]]) -> float:
    return math.sqrt(sum(x * x for row in m for x in row))


def slow_orthogonal(layers: list[RankOneLinear]) -> float:
    total = 0.0
    for layer in layers:
        a, b, r = layer.A.tolist(), layer.B.tolist(), layer.rank
        aat = [[sum(a[i][k] * a[j][k] for k in range(layer.in_features)) - (i == j) for j in range(r)]
               for i in range(r)]
        btb = [[sum(b[k][i] * b[k][j] for k in range(layer.out_features)) - (i == j) for j in range(r)]
               for i in range(r)]
        total += (frobenius(aat) + frobenius(btb)) / 2
    return total / len(layers)


def test_registered() -> None:
    assert {"dem", "orthogonal"} <= set(list_regularizers())
    with pytest.raises(ValueError, match="unknown regularizer 'l2'; registered regularizers: .*dem.*orthogonal"):
        get_regularizer("l2")


def test_dem_matches_slow_reference() -> None:
    layers = random_layers()
    value = get_regularizer("dem")(layers)
    assert value.item() == pytest.approx(slow_dem(layers), rel=1e-12)
    # A vector with equal entries has no variance: DEM pulls towards that.
    with torch.no_grad():
        for layer in layers:
            layer.A.fill_(0.3)
            layer.B.copy_(torch.arange(layer.r0, dtype=torch.float64).expand_as(layer.B))
    assert get_regularizer("dem")(layers).item() == pytest.approx(0.0, abs=1e-15)


def test_dem_gradient_matches_finite_differences() -> None:
    layers = random_layers(seed=1)
    dem = get_regularizer("dem")
    dem(layers).backward()
    layer, eps = layers[1], 1e-6
    for i, j in ((0, 0), (2, 6)):
        with torch.no_grad():
            layer.A[i, j] += eps
            up = slow_dem(layers)
            layer.A[i, j] -= 2 * eps
            down = slow_dem(layers)
            layer.A[i, j] += eps
        assert layer.A.grad[i, j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)  # type: ignore[index]


def test_orthogonal_matches_slow_reference() -> None:
    layers = random_layers(r0=4, seed=2)
    assert get_regularizer("orthogonal")(layers).item() == pytest.approx(slow_orthogonal(layers), rel=1e-12)
    # Orthonormal rows of A and columns of B give zero.
    with torch.no_grad():
        for layer in layers[:1]:
            layer.A.copy_(torch.linalg.qr(torch.randn(5, 4, dtype=torch.float64)).Q.T)
            layer.B.copy_(torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q)
    assert get_regularizer("orthogonal")(layers[:1]).item() == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_uses_the_current_rank_after_compaction() -> None:
    layers = random_layers(r0=4, seed=3)
    for layer in layers:
        layer.freeze_mask(torch.tensor([True, False, True, True]))
        layer.compact()
    assert layers[0].A.shape[0] == 3
    assert get_regularizer("orthogonal")(layers).item() == pytest.approx(slow_orthogonal(layers), rel=1e-12)


@pytest.mark.parametrize(("name", "stops"), [("dem", True), ("orthogonal", False)])
def test_controller_weights_the_regulariser_and_switches_dem_off_after_the_freeze(name: str, stops: bool) -> None:
    model = adapted_bert(0)
    controller = PruningController(model, make_scorer("magnitude"), "dora", 8, target_rank=2, warmup=1, final=3,
                                   interval=1, regularizer=name, reg_weight=0.25)
    layers = list(controller.layers.values())
    reference = slow_dem if name == "dem" else slow_orthogonal
    optimizer = adamw(model)
    for step in range(8):
        before = controller.regularization_loss()
        if controller.frozen and stops:
            assert before.item() == 0.0 and not before.requires_grad
        else:
            assert before.item() == pytest.approx(0.25 * reference(layers), rel=1e-10)
            assert before.requires_grad  # it trains the adapters
        train(model, optimizer, controller, batches(1, seed=step))
        assert controller.frozen == (step >= 8 - 3)
    off = PruningController(model, make_scorer("magnitude"), "dora", 8, target_rank=2, warmup=1, final=3,
                            regularizer=name, reg_weight=0.0)
    assert off.regularization_loss().item() == 0.0
