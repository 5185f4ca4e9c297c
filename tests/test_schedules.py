"""Budget schedules: the shared matrix over every registered schedule, the closed forms of
docs/algorithms.md section 3 at the phase boundaries and in between, the prune-step cadence, and
the configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import AdaLoraConfig
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

from dora_lab import get_schedule, register_schedule
from dora_lab.core.schedules import SCHEDULES, BudgetSchedule, resolve_steps

# T = 20 steps, t_i = 4, t_f = 6: decay over steps 4..14 (span 10), last pruning step 14.
T, TI, TF, N, NT = 20, 4, 6, 48, 24


def sched(name: str, interval: int = 1, **kw: int) -> BudgetSchedule:
    args = dict(name=name, total_steps=T, start=N, target=NT, warmup_steps=TI, final_steps=TF, interval=interval)
    args.update(kw)
    return BudgetSchedule(**args)  # type: ignore[arg-type]


# -- the shared matrix --------------------------------------------------------------------------------
def test_budget_never_increases_and_ends_at_the_target(schedule_name: str) -> None:
    for total, ti, tf, start, target in ((T, TI, TF, N, NT), (57, 9, 20, 72, 12), (10, 0, 1, 5, 0)):
        s = BudgetSchedule(schedule_name, total, start, target, ti, tf, interval=3)
        curve = s.curve()
        assert len(curve) == total
        assert all(later <= earlier for earlier, later in zip(curve, curve[1:], strict=False)), curve
        assert all(isinstance(b, int) and target <= b <= start for b in curve), curve
        assert curve[:ti] == [start] * ti  # warm-up: no pruning
        final = target if s.prunes else start
        assert curve[total - tf :] == [final] * tf  # from the last pruning step on
        if s.prunes:
            assert s.budget(total - tf) == target and s.is_prune_step(total - tf)
            assert s.is_final_step(total - tf)
        else:
            assert not any(s.is_prune_step(t) for t in range(total))


def test_a_schedule_that_stops_short_still_ends_exactly_at_the_target() -> None:
    """A user's logistic curve reaches only ~99% of the way at p = 1; the shared phases promise the
    target from the last pruning step on, whatever the curve returns there."""

    def sigmoid(p: float, start: int, target: int) -> int:
        return start - int((start - target) / (1 + math.exp(-10 * (p - 0.5))))

    assert sigmoid(1.0, N, NT) == NT + 1
    register_schedule("test_sigmoid")(sigmoid)
    try:
        s = sched("test_sigmoid")
        assert s.budget(T - TF - 1) > NT
        assert [s.budget(t) for t in range(T - TF, T)] == [NT] * TF
    finally:
        SCHEDULES.remove("test_sigmoid")


# -- closed forms -------------------------------------------------------------------------------------
def closed_form(name: str, t: int) -> int:
    """docs/algorithms.md section 3, written from the text."""
    p = min(max((t - TI) / (T - TI - TF), 0.0), 1.0)
    if name == "dora":
        return N - int((N - NT) * p**3)
    if name == "adalora":
        return NT + int((N - NT) * (1 - p) ** 3)
    if name == "linear":
        return N - int((N - NT) * p)
    assert name == "constant"
    return N


BOUNDARIES = [0, TI - 1, TI, TI + 1, 7, 9, 13, T - TF, T - TF + 1, T - 1]


@pytest.mark.parametrize("name", ["dora", "adalora", "linear", "constant"])
def test_builtin_schedules_follow_their_closed_forms(name: str) -> None:
    s = sched(name)
    for t in BOUNDARIES:
        assert s.budget(t) == closed_form(name, t), (name, t)


# Hand-computed: at t = 6, p = 0.2; at t = 9, p = 0.5; at t = 12, p = 0.8 (N - N_T = 24).
HAND = {
    "dora": {TI: 48, 6: 48 - 0, 9: 48 - 3, 12: 48 - 12, T - TF: 24, T - 1: 24},  # 24 p^3 = .192, 3, 12.288
    "adalora": {TI: 48, 6: 24 + 12, 9: 24 + 3, 12: 24 + 0, T - TF: 24, T - 1: 24},  # 24 (1-p)^3 = 12.288, 3, .192
    "linear": {TI: 48, 6: 48 - 4, 9: 48 - 12, 12: 48 - 19, T - TF: 24, T - 1: 24},  # 24 p = 4.8, 12, 19.2
    "constant": {TI: 48, 6: 48, 9: 48, 12: 48, T - TF: 48, T - 1: 48},
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_builtin_schedules_against_hand_values(name: str) -> None:
    s = sched(name)
    assert {t: s.budget(t) for t in HAND[name]} == HAND[name]
    assert s.progress(TI) == 0.0 and s.progress(9) == 0.5 and s.progress(T - TF) == 1.0 and s.progress(T - 1) == 1.0


def test_adalora_schedule_equals_peft_budget_schedule() -> None:
    """PEFT's RankAllocator.budget_schedule (init_r 4 over 12 matrices, target_r 2) step by step."""
    # Parameter names like "3.lora_A.default", shaped (init_r, d_in): all RankAllocator reads.
    model = nn.ModuleList(
        nn.ModuleDict({"lora_A": nn.ParameterDict({"default": nn.Parameter(torch.zeros(4, 3))})})
        for _ in range(12)
    )
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=T, tinit=TI, tfinal=TF, deltaT=1, target_modules=["x"])
    allocator = RankAllocator(model, config, "default")
    assert (allocator.init_bgt, allocator.target_bgt) == (N, NT)
    ours = sched("adalora")
    assert [allocator.budget_schedule(t)[0] for t in range(T)] == ours.curve()


# -- cadence and phases -------------------------------------------------------------------------------
@pytest.mark.parametrize("interval", [1, 3, 4, 100])
def test_prune_steps_every_interval_from_warmup_and_at_the_last_pruning_step(interval: int) -> None:
    s = sched("dora", interval=interval)
    expected = {t for t in range(TI, T - TF + 1) if (t - TI) % interval == 0} | {T - TF}
    assert {t for t in range(T) if s.is_prune_step(t)} == expected
    assert [t for t in range(T) if s.is_final_step(t)] == [T - TF]
    assert s.end_step == T - TF
    phases = [s.phase(t) for t in range(T)]
    assert phases == ["warmup"] * TI + ["decay"] * (T - TF - TI + 1) + ["final"] * (TF - 1)


def test_interval_3_prune_steps_by_hand() -> None:
    assert [t for t in range(T) if sched("linear", interval=3).is_prune_step(t)] == [4, 7, 10, 13, 14]


# -- configuration errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"warmup_steps": 10, "final_steps": 10}, r"warm-up \(10 steps\) \+ final \(10 steps\) >= total steps \(20\)"),
        ({"warmup_steps": 15, "final_steps": 6}, r"no step is left for pruning"),
        ({"target": 49}, r"target budget \(49\) is above the start budget \(48\)"),
        ({"interval": 0}, r"interval must be >= 1 step, got 0"),
        ({"final_steps": 0}, r"at least one step with the mask frozen"),
        ({"target": -1}, r"cannot be negative"),
        ({"total_steps": 0}, r"total_steps must be >= 1"),
    ],
)
def test_bad_schedule_configs_raise_value_error(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sched("dora", **overrides)


def test_unknown_schedule_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'cubic'; registered schedules: adalora, constant, dora"):
        sched("cubic")


def test_resolve_steps_reads_fractions_and_counts() -> None:
    assert resolve_steps(0.15, 1000) == 150
    assert resolve_steps(0.5, 7) == 4  # round(3.5) -> 4 (banker's rounding: 4 is even)
    assert resolve_steps(0, 100) == 0
    assert resolve_steps(800, 100_000) == 800
    with pytest.raises(ValueError, match="cannot be negative, got -1"):
        resolve_steps(-1, 10)


def test_schedule_functions_are_pure_in_p() -> None:
    dora = get_schedule("dora")
    assert dora(0.0, 100, 10) == 100 and dora(1.0, 100, 10) == 10 and dora(0.5, 100, 10) == 100 - int(90 / 8)
