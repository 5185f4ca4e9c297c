"""What an allocation method sees (issue 26): a frozen MethodContext the controller builds, never the
controller; the configured scorer only for a method that declares ``uses_scorer``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dora_lab import (
    AllocationMethod,
    MethodContext,
    Pool,
    PruningController,
    RankOneLinear,
    make_method,
    make_scorer,
)


def layers(r0: int = 3) -> dict[str, RankOneLinear]:
    torch.manual_seed(0)
    return {n: RankOneLinear(torch.nn.Linear(5, 4).double(), r0=r0, dropout=0.0) for n in "ab"}


def controller(method: AllocationMethod, target_params: int | None = None, **kw: object) -> PruningController:
    budget = {"target_params": target_params} if target_params else {"target_rank": 2}
    return PruningController(layers(), make_scorer("magnitude"), "linear", 10, warmup=1, final=2, interval=1,
                             compact=False, method=method, **budget, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "params", "scored"), [
    ("dora", {}, True), ("increlora", {"importance": "scorer"}, True), ("increlora", {}, False),
    ("sora", {}, False), ("dylora", {}, False), ("alora", {}, False)])
def test_the_scorer_is_in_the_context_only_for_a_method_that_declares_it(name: str, params: dict[str, str],
                                                                        scored: bool) -> None:
    ctl = controller(make_method(name, **params))
    ctx = ctl.method.ctx
    assert isinstance(ctx, MethodContext) and not isinstance(ctx, PruningController)
    assert ctl.method.uses_scorer is scored
    assert ctx.scorer is (ctl.scorer if scored else None)
    assert ctl.method.ctl is ctx  # the old name reads the same context


def test_the_context_carries_the_budget_and_follows_the_run() -> None:
    ctl = controller(make_method("dora"), target_params=2 * 11)  # parameters: d_in + d_out + 1 = 10 each
    ctx = ctl.method.ctx
    # by hand: 2 layers x 3 components x (5 + 4 + 1) parameters
    assert (ctx.unit, ctx.capacity, ctx.target, ctx.total_steps) == ("parameters", 60, 22, 10)
    assert ctx.cost(ctx.layers["a"]) == 10 and ctx.active_budget() == 60
    assert ctx.schedule is ctl.schedule and ctx.layers is ctl.layers
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.target = 5  # type: ignore[misc]
    seen = []
    for _ in range(10):
        info = ctl.step()
        seen.append((ctx.step, ctx.frozen))
        assert (ctx.step, ctx.frozen) == (ctl.t, ctl.frozen) == (info.step + 1, info.frozen)
    assert seen[-1] == (10, True) and (7, False) in seen  # the freeze at T - t_f = 8
    assert ctx.capacity == 60 and ctx.active_budget() <= 22  # the pool's size is the start's, fixed


def test_a_growing_method_gets_the_pool_before_the_schedule() -> None:
    asked: list[object] = []

    class Grows(AllocationMethod):
        grows = True

        def start_budget(self, pool: Pool) -> int:
            asked.append(pool)
            return len(pool.layers)

    ctl = controller(Grows())
    assert type(asked[0]) is Pool and ctl.schedule.start == 2 and ctl.method.ctx.capacity == 6


def test_a_method_that_reads_the_scorer_without_declaring_it_is_told_so() -> None:
    class Undeclared(AllocationMethod):
        def decide(self, t: int, update_scores: bool) -> dict[str, torch.Tensor] | None:
            self.configured_scorer().scores()
            return None

    ctl = controller(Undeclared())
    with pytest.raises(RuntimeError, match=r"reads the configured scorer but does not declare uses_scorer = True"):
        ctl.method.decide(1, True)


def test_increlora_with_its_official_importance_leaves_the_scorer_alone() -> None:
    """Only importance: scorer reads the configured scorer; the official module score feeds it nothing."""
    official, by_scorer = controller(make_method("increlora")), controller(make_method("increlora", importance="scorer"))
    for ctl in (official, by_scorer):
        ctl.method.after_optimizer_step(0, None, True)
    assert official.scorer.scores() == {} and set(by_scorer.scorer.scores()) == {"a", "b"}
