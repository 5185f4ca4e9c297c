"""The allocation-method protocol (dora_lab.core.methods): the component pool, keep-by-threshold,
growing schedules, the config's method block, and the shared matrix over every registered method."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import adamw, adapted_bert, batches, train

import dora_lab
from dora_lab import PruningController, RankOneLinear, make_method, make_scorer
from dora_lab.core.methods import keep_top, keep_where
from dora_lab.core.schedules import BudgetSchedule
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError

REPO = Path(__file__).resolve().parents[1]


def layer(d_in: int = 5, d_out: int = 4, r0: int = 3, seed: int = 0) -> RankOneLinear:
    torch.manual_seed(seed)
    return RankOneLinear(torch.nn.Linear(d_in, d_out).double(), r0=r0, dropout=0.0)


# -- the component pool -----------------------------------------------------------------------------
def test_activate_makes_a_fresh_component_and_zeroes_only_its_optimizer_state() -> None:
    lay = layer()
    opt = torch.optim.AdamW(lay.parameters(), lr=0.1)
    x = torch.randn(7, 5, dtype=torch.float64)
    for _ in range(3):
        lay.c.data += 0.5  # so every component has gradients
        lay(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    before = {k: v.clone() for k, v in opt.state[lay.A].items()}
    a, b = lay.A.detach().clone(), lay.B.detach().clone()
    lay.mask[1] = 0.0
    lay.activate(torch.tensor([False, True, False]), opt, torch.Generator().manual_seed(0))
    assert lay.mask.tolist() == [1.0, 1.0, 1.0] and lay.c[1].item() == 0.0
    bound_a, bound_b = math.sqrt(6 / 5), math.sqrt(6 / 3)  # kaiming_uniform_(a=0): sqrt(6 / fan_in)
    assert not torch.equal(lay.A[1], a[1]) and lay.A[1].abs().max() <= bound_a
    assert not torch.equal(lay.B[:, 1], b[:, 1]) and lay.B[:, 1].abs().max() <= bound_b
    torch.testing.assert_close(lay.A[[0, 2]], a[[0, 2]], rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[lay.A][key]
        assert bool((state[1] == 0).all()) and bool((before[key][1] != 0).any())
        torch.testing.assert_close(state[[0, 2]], before[key][[0, 2]], rtol=0, atol=0)
        assert bool((opt.state[lay.B][key][:, 1] == 0).all()) and opt.state[lay.c][key][1].item() == 0.0


def test_hard_masked_slots_get_no_gradient() -> None:
    lay = layer()
    lay.c.data.fill_(1.0)
    lay.soft_prune(torch.tensor([True, False, True]))
    lay.hard_mask = True
    lay(torch.randn(6, 5, dtype=torch.float64)).sum().backward()
    assert lay.A.grad is not None and lay.B.grad is not None and lay.c.grad is not None
    assert bool((lay.A.grad[1] == 0).all()) and bool((lay.B.grad[:, 1] == 0).all()) and lay.c.grad[1].item() == 0
    assert bool((lay.A.grad[0] != 0).any())


def test_a_reserve_trains_its_a_and_b_outside_the_budget_and_is_promoted_with_them() -> None:
    from dora_lab.export.peft import lora_factors

    lay = layer()
    lay.c.data.fill_(0.5)
    lay.soft_prune(torch.tensor([True, False, False]))
    lay.hard_mask = True
    with pytest.raises(ValueError, match="must be inactive"):
        lay.set_reserve(torch.tensor([True, False, False]), 0.01)
    lay.set_reserve(torch.tensor([False, True, False]), 0.01, fresh=False)
    assert lay.active_rank == 1 and lay.active_parameters() == 10  # the reserve is not counted
    # its fixed gate stands in for c * mask: delta W = scale (0.5 b0 a0 + 0.01 b1 a1)
    a, b = lay.A.detach(), lay.B.detach()
    expected = lay.scale * (0.5 * torch.outer(b[:, 0], a[0]) + 0.01 * torch.outer(b[:, 1], a[1]))
    torch.testing.assert_close(lay.delta_weight().detach(), expected, rtol=1e-12, atol=0)
    lora_a, lora_b = lora_factors(lay)  # the PEFT export keeps what the forward pass uses
    torch.testing.assert_close(lora_b @ lora_a, expected, rtol=1e-12, atol=1e-15)
    opt = torch.optim.AdamW(lay.parameters(), lr=0.1)
    x = torch.randn(7, 5, dtype=torch.float64)
    a1 = lay.A[1].detach().clone()
    for _ in range(3):
        lay(x).pow(2).sum().backward()
        assert bool((lay.A.grad[1] != 0).all()) and lay.c.grad[1].item() == 0  # type: ignore[index]
        assert bool((lay.A.grad[2] == 0).all())  # type: ignore[index]
        opt.step()
        opt.zero_grad()
    assert not torch.equal(lay.A[1], a1) and lay.c[1].item() == 0.0 and lay.mask.tolist() == [1.0, 0.0, 0.0]
    trained_a, trained_b = lay.A[1].detach().clone(), lay.B[:, 1].detach().clone()
    moments = {k: opt.state[lay.A][k][1].clone() for k in ("exp_avg", "exp_avg_sq")}
    out = lay(x).detach()
    lay.activate(torch.tensor([False, True, True]), opt, torch.Generator().manual_seed(0))
    # the reserve is promoted: its trained A/B and their moments kept, c starts at its gate
    assert torch.equal(lay.A[1], trained_a) and torch.equal(lay.B[:, 1], trained_b)
    assert lay.c[1].item() == 0.01 and lay.reserve is None and lay.mask.tolist() == [1.0, 1.0, 1.0]
    for k, v in moments.items():
        assert torch.equal(opt.state[lay.A][k][1], v) and bool((v != 0).any())
        assert opt.state[lay.c][k][1].item() == 0.0 and bool((opt.state[lay.A][k][2] == 0).all())
    assert lay.c[2].item() == 0.0
    torch.testing.assert_close(lay(x).detach(), out, rtol=0, atol=1e-13)  # neither changed the output
    # freezing the mask ends a reserve; a soft-masked layer cannot hold one
    lay.soft_prune(torch.tensor([True, True, False]))
    lay.set_reserve(torch.tensor([False, False, True]), 0.01, opt, torch.Generator().manual_seed(1))
    lay.freeze_mask(torch.tensor([True, True, False]))
    assert lay.reserve is None and lay.effective_c()[2].item() == 0.0
    with pytest.raises(RuntimeError, match="needs a hard mask"):
        layer().set_reserve(torch.tensor([False, True, False]), 0.01)


# -- decision rules and growing schedules -----------------------------------------------------------------
def test_keep_where_keeps_above_the_threshold_with_the_budget_as_a_cap() -> None:
    layers = {"x": layer(r0=3), "y": layer(r0=2, seed=1)}
    values = {"x": torch.tensor([0.5, 0.0, -0.2]), "y": torch.tensor([0.05, 0.3])}
    unit = lambda _: 1  # noqa: E731
    kept = keep_where(layers, {n: v.abs() for n, v in values.items()}, 0.1, cap=10, cost=unit)
    assert {n: k.tolist() for n, k in kept.items()} == {"x": [True, False, True], "y": [False, True]}
    capped = keep_where(layers, {n: v.abs() for n, v in values.items()}, 0.1, cap=2, cost=unit)
    assert {n: k.tolist() for n, k in capped.items()} == {"x": [True, False, False], "y": [False, True]}
    # in parameters (cost d_in + d_out + 1 = 10 each): a cap of 25 fits two
    assert sum(int(k.sum()) for k in keep_where(layers, values, 0.1, 25, lambda lay: 10).values()) == 2
    top = keep_top(layers, {"x": torch.tensor([3.0, 1.0, 2.0]), "y": torch.tensor([2.5, 0.5])}, 2, unit)
    assert {n: k.tolist() for n, k in top.items()} == {"x": [True, False, False], "y": [True, False]}


def test_a_growing_schedule_rises_by_the_same_formula_and_ends_at_its_cap() -> None:
    sched = BudgetSchedule("dora", total_steps=20, start=10, target=30, warmup_steps=2, final_steps=8,
                           interval=1, grows=True)
    curve = sched.curve()
    assert curve[0] == 10 and curve[12:] == [30] * 8
    assert all(b <= a2 for b, a2 in zip(curve, curve[1:], strict=False))
    assert sched.budget(7) == 10 + int(20 * 0.5**3)  # p = (7 - 2) / 10: start - int((start - target) p^3)
    with pytest.raises(ValueError, match=r"growing schedule's start budget \(40\) is above its cap"):
        BudgetSchedule("dora", 20, start=40, target=30, warmup_steps=2, final_steps=8, grows=True)
    with pytest.raises(ValueError, match="above the start budget"):
        BudgetSchedule("dora", 20, start=10, target=30, warmup_steps=2, final_steps=8)


# -- the config's method block ----------------------------------------------------------------------------
def test_the_default_method_is_dora() -> None:
    cfg = load_config(REPO / "configs" / "cola.yaml")
    assert (cfg.method.name, cfg.method.params) == ("dora", {})
    assert make_method().name == "dora"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.name=lora_magic"], "method.name: unknown method 'lora_magic'; registered methods: alora, dora, "),
        (["method.name=sora", "method.params.lamda=0.1"],
         "method.params: method 'sora' has no hyper-parameter(s) ['lamda']; it takes: xi (default 0.0003), lam (default None)"),
        (["method.name=increlora", "schedule.name=constant"],
         "schedule.name: method 'increlora' acts at the schedule's prune steps, but schedule 'constant' has none"),
        (["method.name=increlora", "method.params.start_rank=3"],
         "method.params.start_rank (3) is above the cap budget.target_rank (2): a growing method starts below"),
        (["method.name=sora", "method.params.lam=1.5"], "lam = 1.5 keeps nothing"),
        (["method.name=sora", "method.params.threshold=.inf"], "threshold must be finite and >= 0"),
        (["method.name=sora", "method.params.xi=0"], "xi must be finite and > 0"),
        (["method.name=sora", "method.params.gate_init=ones"], "gate_init must be one of normal, zero"),
        (["method.name=increlora", "method.params.importance=scores"], "importance must be one of official, scorer"),
        (["method.name=increlora", "method.params.beta1=1"], "beta1 must be in [0, 1)"),
        (["method.name=alora", "method.params.score=three"], "score must be one of paper, two_term"),
        (["method.name=eva", "method.params.label_mask=1"], "label_mask must be true or false"),
    ],
)
def test_bad_method_blocks_are_refused_with_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "cola.yaml", overrides)
    assert needle in str(err.value)


# -- the shared matrix: every registered method ----------------------------------------------------------
T, WARMUP, FINAL, INTERVAL = 12, 2, 3, 2


@pytest.mark.parametrize("unit", ["components", "parameters"])
def test_every_method_ends_at_its_target_and_never_exceeds_the_cap(method_name: str, schedule_name: str,
                                                                      unit: str) -> None:
    """Every registered method x every registered schedule (the scorers' own matrix is test_controller's)."""
    prunes = getattr(dora_lab.get_schedule(schedule_name), "prunes", True)
    method = make_method(method_name)
    if not prunes and (method.follows_schedule or method.grows):
        pytest.skip(f"{method_name} acts at the schedule's prune steps; {schedule_name} has none (config refuses it)")
    model = adapted_bert(0, dtype=torch.float32)
    budget = {"target_rank": 1.5} if unit == "components" else {"target_params": 3000}
    controller = PruningController(model, make_scorer("magnitude"), schedule_name, T, warmup=WARMUP, final=FINAL,
                                   interval=INTERVAL, method=method, **budget)  # type: ignore[arg-type]
    data = batches(T)
    controller.before_training(lambda b: model(input_ids=b[0], labels=b[1]), data)  # a no-op unless the method reads batches
    if method.needs_validation:
        xv, yv = batches(1, seed=1)[0]
        controller.set_validation(lambda: float(model(input_ids=xv, labels=yv).loss))
    optimizer = adamw(model)
    infos = train(model, optimizer, controller, data)
    used = [i.active_components if unit == "components" else i.active_parameters for i in infos]
    target = controller.target if controller.method.changes_allocation else controller.capacity
    cap = controller.capacity  # the cap in force: the budget of the last decision (the start before any)
    for info, active in zip(infos, used, strict=True):
        if info.pruned:
            cap = info.budget
        assert active <= cap, (method_name, info)
        assert info.budget <= controller.capacity
    assert infos[-1].budget == target and infos[-1].frozen == controller.method.changes_allocation
    if unit == "components" and method.exact_target:
        assert used[-1] == target, (method_name, used)
    else:
        assert 0 < used[-1] <= target, (method_name, used)
    assert sum(lay.rank for lay in controller.layers.values()) == sum(controller.allocation().values()) or not prunes
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}  # compaction moved them


# -- the manual's growing method (docs/extending.md), run exactly as printed ------------------------------
def readme_method_snippet() -> str:
    text = (REPO / "docs" / "extending.md").read_text()
    section = text.split("## Add your own allocation method", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_growing_method_runs_and_grows_to_its_cap() -> None:
    code = readme_method_snippet()
    assert len(code.strip().splitlines()) < 30
    exec(compile(code, "docs/extending.md", "exec"), {})  # noqa: S102  (our own manual)
    try:
        model = adapted_bert(0, dtype=torch.float32)
        controller = PruningController(model, make_scorer("magnitude"), "linear", T, target_rank=2, warmup=WARMUP,
                                       final=FINAL, interval=1, method=make_method("grow_where_grad"))
        assert controller.schedule.start == 12 and controller.allocation() == dict.fromkeys(controller.layers, 1)
        infos = train(model, adamw(model), controller, batches(T))
        active = [i.active_components for i in infos]
        assert all(a <= i.budget for a, i in zip(active, infos, strict=True))
        assert all(a2 >= a1 for a1, a2 in zip(active, active[1:], strict=False)) and active[-1] > 12
        assert infos[-1].frozen and active[-1] <= 24
        assert sum(lay.rank for lay in controller.layers.values()) == active[-1]  # compacted
    finally:
        from dora_lab.core.methods import METHODS

        METHODS.remove("grow_where_grad")


def test_a_growing_method_starting_above_a_parameter_cap_is_refused_before_training() -> None:
    from dora_lab.run.config import build_controller

    cfg = load_config(REPO / "configs" / "cola.yaml", ["method.name=increlora", "method.params.start_rank=2",
                                                        "budget.target_params=1000"])
    with pytest.raises(ConfigError, match=r"method 'increlora' grows, but its start budget \(1816 parameters\) is "
                                          r"above its cap, the target \(1000\): lower its start \(method.params\)"):
        build_controller(cfg, adapted_bert(0), 100)  # start_rank 2 in each of 12 matrices: 2 x (8 x 65 + 4 x 97)
