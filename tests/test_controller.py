"""The pruning controller: a full run for every scorer x schedule pair, the global top-k decision,
soft pruning during the decay, the frozen mask after it, and the parameter budget unit."""

from __future__ import annotations

import pytest
import torch
from conftest import adamw, adapted_bert, batches, randomize_c, slow_magnitude, train

from dora_lab import PruningController, adapter_layers, get_schedule, make_scorer

T, WARMUP, FINAL, INTERVAL = 12, 2, 3, 2  # decay over steps 2..9, prune at 2, 4, 6, 8, 9
TARGET_RANK = 1.5  # 18 of the 48 components of the tiny BERT (12 layers x r0 = 4)


# -- the shared matrix: a full controller run ---------------------------------------------------------
def test_full_run_ends_with_exactly_the_target(scorer_name: str, schedule_name: str) -> None:
    model = adapted_bert(0, dtype=torch.float32)
    layers = adapter_layers(model)
    controller = PruningController(model, make_scorer(scorer_name), schedule_name, T, target_rank=TARGET_RANK,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL)
    optimizer = adamw(model)
    infos = train(model, optimizer, controller, batches(T))
    prunes = getattr(get_schedule(schedule_name), "prunes", True)
    target = 18 if prunes else 48

    assert [i.step for i in infos] == list(range(T))
    budgets = [i.budget for i in infos]
    active = [i.active_components for i in infos]
    assert all(b2 <= b1 for b1, b2 in zip(budgets, budgets[1:], strict=False)), budgets
    assert all(a2 <= a1 for a1, a2 in zip(active, active[1:], strict=False)), active
    assert budgets[0] == 48 and budgets[T - FINAL :] == [target] * FINAL
    for info in infos:
        if info.pruned:
            assert info.active_components == info.budget, info
    assert active[-1] == target == sum(layer.active_rank for layer in layers.values())
    assert sum(controller.allocation().values()) == target
    assert [i.pruned for i in infos] == [prunes and t in (2, 4, 6, 8, 9) for t in range(T)]
    assert [i.frozen for i in infos] == [prunes and t >= T - FINAL for t in range(T)]
    if prunes:  # compacted: only the survivors are stored, with their original indices
        assert sum(layer.rank for layer in layers.values()) == target
        for layer in layers.values():
            assert layer.hard_mask and bool((layer.mask == 1).all()) and layer.index.numel() == layer.rank
            assert layer.A.shape == (layer.rank, layer.in_features) and layer.B.shape == (layer.out_features, layer.rank)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}  # compaction moved them
    assert infos[-1].active_parameters == sum(layer.active_parameters() for layer in layers.values())


def test_controller_scores_every_step_until_the_freeze_and_prunes_by_the_ema() -> None:
    """magnitude's EMA (beta 0.9) fed once per step from step 0 to the last pruning step, then the
    final mask is the global top-18 of that EMA."""
    model = adapted_bert(0)
    randomize_c(model)
    controller = PruningController(model, make_scorer("magnitude"), "dora", T, target_rank=TARGET_RANK,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL)
    layers = controller.layers
    ema = {n: torch.zeros(4, dtype=torch.float64) for n in layers}
    fed: list[int] = []

    def reference(_: int) -> None:  # runs just before controller.step, on the same weights
        if controller.t <= T - FINAL:
            fed.append(controller.t)
            for n, layer in layers.items():
                ema[n] = 0.9 * ema[n] + 0.1 * slow_magnitude(layer)

    train(model, adamw(model), controller, batches(T), before_step=reference)
    assert fed == list(range(T - FINAL + 1))
    for n, s in controller.scorer.scores().items():
        torch.testing.assert_close(s.double(), ema[n], rtol=1e-5, atol=1e-7)
    top = sorted(((float(v), n, i) for n, e in ema.items() for i, v in enumerate(e)), reverse=True)[:18]
    kept = {(n, int(i)) for n, layer in layers.items() for i in layer.index.tolist()}
    assert kept == {(n, i) for _, n, i in top}


# -- the decision -------------------------------------------------------------------------------------
def trained(steps: int = 2, scorer: str = "sensitivity", **kw: object) -> tuple[torch.nn.Module, PruningController]:
    model = adapted_bert(0)
    randomize_c(model)
    kw.setdefault("target_rank", 2)
    controller = PruningController(model, make_scorer(scorer), "dora", 20, warmup=10, final=5, **kw)  # type: ignore[arg-type]
    train(model, adamw(model), controller, batches(steps))  # warm-up: scores only
    return model, controller


def test_decide_keeps_the_global_top_budget() -> None:
    model, controller = trained()
    scores = controller.scorer.scores()
    ranked = sorted(((float(v), n, i) for n, s in scores.items() for i, v in enumerate(s)), reverse=True)
    for budget in (0, 1, 7, 30, 48):
        keep = controller.decide(budget)
        expected = {(n, i) for _, n, i in ranked[:budget]}
        got = {(n, i) for n, k in keep.items() for i, flag in enumerate(k.tolist()) if flag}
        assert got == expected
    # decide() changes nothing
    assert all(layer.active_rank == 4 for layer in adapter_layers(model).values())
    # the ranking is global: layers end up with different ranks
    assert len(set(controller.decide(20)[n].sum().item() for n in scores)) > 1


def test_decide_in_parameters_is_a_greedy_fill_that_never_exceeds_the_budget() -> None:
    model, controller = trained(target_rank=None, target_params=1000)
    layers = controller.layers
    assert controller.unit == "parameters" and controller.schedule.start == 3632
    scores = controller.scorer.scores()
    ranked = sorted(((float(v), n, i) for n, s in scores.items() for i, v in enumerate(s)), reverse=True)
    for budget in (64, 500, 1000):
        used, expected = 0, set[tuple[str, int]]()
        for _, n, i in ranked:
            cost = layers[n].in_features + layers[n].out_features + 1
            if used + cost <= budget:
                used, expected = used + cost, expected | {(n, i)}
        keep = controller.decide(budget)
        assert {(n, i) for n, k in keep.items() for i, f in enumerate(k.tolist()) if f} == expected
        controller.apply(keep)
        assert sum(layer.active_parameters() for layer in layers.values()) == used <= budget


def test_parameter_budget_run_ends_at_or_below_the_target() -> None:
    model = adapted_bert(0, dtype=torch.float32)
    controller = PruningController(model, make_scorer("magnitude"), "linear", T, target_params=1200,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL)
    infos = train(model, adamw(model), controller, batches(T))
    assert infos[0].budget == 3632 and infos[-1].budget == 1200
    assert 1200 - 97 < infos[-1].active_parameters <= 1200  # the greedy fill leaves less than one component


# -- soft pruning, then the frozen mask ---------------------------------------------------------------
def test_soft_pruned_components_can_come_back_and_freeze_stops_scoring() -> None:
    model = adapted_bert(0)
    randomize_c(model)
    layers = adapter_layers(model)
    controller = PruningController(model, make_scorer("magnitude", beta=None), "linear", 14, target_rank=1,
                                   warmup=2, final=4, interval=3, compact=False)
    seen: dict[int, dict[str, list[float]]] = {}
    snapshot = lambda _: seen.__setitem__(controller.t, {n: m.c.tolist() for n, m in layers.items()})  # noqa: E731
    data = batches(14)
    opt = adamw(model, lr=0.05)
    infos = train(model, opt, controller, data[:6], before_step=snapshot)  # prune steps 2 and 5
    assert infos[2].pruned and infos[2].budget == 48  # p = 0 at t_i: nothing to prune yet
    assert infos[5].pruned and infos[5].budget == 48 - int(36 * 3 / 8) == 35 and not controller.frozen
    pruned = [(n, i) for n, layer in layers.items() for i, m in enumerate(layer.mask.tolist()) if m == 0]
    assert len(pruned) == 13 and all(layers[n].c[i] == 0 for n, i in pruned)
    assert not any(layer.hard_mask for layer in layers.values())
    infos += train(model, opt, controller, data[6:8], before_step=snapshot)
    assert all(seen[7][n][i] != 0 for n, i in pruned)  # still trainable: c moved away from zero

    frozen_at = 14 - 4
    infos += train(model, opt, controller, data[8 : frozen_at + 1])
    assert infos[frozen_at].frozen and infos[frozen_at].active_components == 12
    assert infos[frozen_at - 1].budget > 12 and not infos[frozen_at - 1].frozen
    scores = {n: s.clone() for n, s in controller.scorer.scores().items()}
    dws = {n: layer.delta_weight().detach().clone() for n, layer in layers.items()}
    infos += train(model, opt, controller, data[frozen_at + 1 :])
    assert [i.phase for i in infos] == ["warmup"] * 2 + ["decay"] * 9 + ["final"] * 3
    for n, s in controller.scorer.scores().items():
        assert torch.equal(s, scores[n])  # no scoring after the freeze
    for n, layer in layers.items():
        assert layer.hard_mask and layer.rank == 4  # compact=False keeps the shapes
        off = layer.mask == 0
        assert torch.equal(layer.effective_c()[off], torch.zeros_like(layer.c[off]))
        if layer.active_rank:
            assert not torch.allclose(layer.delta_weight(), dws[n])  # the survivors still train
        kept = (layer.B * layer.c * layer.mask * layer.scale) @ layer.A
        torch.testing.assert_close(layer.delta_weight(), kept)


def test_constant_schedule_never_scores_or_prunes() -> None:
    model = adapted_bert(0, dtype=torch.float32)
    scorer = make_scorer("sensitivity")
    controller = PruningController(model, scorer, "constant", 6, target_rank=1, warmup=1, final=1)
    infos = train(model, adamw(model), controller, batches(6))
    assert scorer.scores() == {} and not any(i.pruned for i in infos)
    assert controller.schedule.target == controller.schedule.start == 48


def test_controller_rejects_bad_arguments() -> None:
    model = adapted_bert(0)
    scorer = make_scorer("magnitude")
    with pytest.raises(ValueError, match="exactly one of target_rank or target_params"):
        PruningController(model, scorer, "dora", 100)
    with pytest.raises(ValueError, match="exactly one of target_rank or target_params"):
        PruningController(model, scorer, "dora", 100, target_rank=2, target_params=10)
    with pytest.raises(ValueError, match="no adapter layers"):
        PruningController(torch.nn.Linear(2, 2), scorer, "dora", 100, target_rank=2)
    with pytest.raises(ValueError, match=r"target budget \(60\) is above the start budget \(48\)"):
        PruningController(model, scorer, "dora", 100, target_rank=5)
    with pytest.raises(ValueError, match=r"warm-up \(50 steps\) \+ final \(50 steps\) >= total steps \(100\)"):
        PruningController(model, scorer, "dora", 100, target_rank=2, warmup=0.5, final=0.5)
    c = PruningController(model, scorer, "dora", 1000, target_rank=2)  # the paper's defaults
    assert (c.schedule.warmup_steps, c.schedule.final_steps, c.schedule.interval) == (150, 500, 100)
    assert c.schedule.target == 24


def test_step_without_optimizer_is_refused_while_compaction_is_pending() -> None:
    """Compaction replaces A, B and c; an optimizer the controller never saw would keep training the
    old tensors.  So step() without one is refused from the first step, naming the fix."""
    model = adapted_bert(0, dtype=torch.float32)
    data = batches(T)
    controller = PruningController(model, make_scorer("magnitude"), "dora", T, target_rank=TARGET_RANK,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL)
    with pytest.raises(ValueError, match=r"controller.step\(optimizer\).*compact=False"):
        controller.step()
    assert controller.t == 0  # nothing happened
    uncompacted = PruningController(model, make_scorer("magnitude"), "dora", T, target_rank=TARGET_RANK,
                                    warmup=WARMUP, final=FINAL, interval=INTERVAL, compact=False)
    optimizer = adamw(model)
    for x, y in data:  # without compaction the controller needs no optimizer
        model(input_ids=x, labels=y).loss.backward()
        optimizer.step()
        info = uncompacted.step()
        optimizer.zero_grad()
    assert info.frozen and info.active_components == 18


@pytest.mark.parametrize("scorer_name", ["magnitude", "smoothed_uncertainty"])
def test_skipped_steps_feed_no_scores_and_an_early_prune_waits(scorer_name: str) -> None:
    """fp16 loss scaling skips a step whose gradients overflowed: step(update_scores=False) still
    advances the schedule but leaves the scores as they were; a prune step reached before any
    score exists waits for the next step instead of failing."""
    model = adapted_bert(0, dtype=torch.float32)
    randomize_c(model)
    data = batches(T)
    opt = adamw(model)
    ctl = PruningController(model, make_scorer(scorer_name), "dora", T, target_rank=TARGET_RANK,
                            warmup=0, final=FINAL, interval=INTERVAL)  # step 0 is a prune step
    infos = []
    for t, (x, y) in enumerate(data):
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        before = {n: s.clone() for n, s in ctl.scorer.scores().items()}
        infos.append(ctl.step(opt, update_scores=t not in (0, 5)))  # steps 0 and 5 "skipped"
        if t == 5:
            assert before.keys() == ctl.scorer.scores().keys()
            for n, s in before.items():
                assert torch.equal(s, ctl.scorer.scores()[n]), n
        opt.zero_grad()
    assert [i.step for i in infos] == list(range(T)) and ctl.t == T
    assert not infos[0].pruned and infos[2].pruned  # step 0 waited (no scores yet); pruning went on
    assert infos[-1].frozen and infos[-1].active_components == 18


def test_step_without_optimizer_is_accepted_once_nothing_is_left_to_compact() -> None:
    model = adapted_bert(0, dtype=torch.float32)
    data = batches(T)
    ctl = PruningController(model, make_scorer("magnitude"), "dora", T, target_rank=TARGET_RANK,
                            warmup=WARMUP, final=FINAL, interval=INTERVAL)
    infos = train(model, adamw(model), ctl, data)
    assert infos[-1].frozen
    assert ctl.step().frozen  # after the freeze and compaction: no optimizer needed
    constant = PruningController(adapted_bert(1, dtype=torch.float32), make_scorer("magnitude"), "constant", T,
                                 target_rank=TARGET_RANK)
    assert constant.step().active_components == 48  # a schedule that never prunes needs none either


def test_agree_replaces_every_decision_before_it_is_applied() -> None:
    """The data-parallel hook: the controller applies what ``agree`` returns (rank 0's decision)."""
    model = adapted_bert(0, dtype=torch.float32)
    seen: list[dict[str, torch.Tensor]] = []

    def agree(keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(keep)
        # keep each layer's last component, whatever the scores said
        return {n: torch.arange(len(k)) == len(k) - 1 for n, k in keep.items()}

    controller = PruningController(model, make_scorer("magnitude"), "dora", T, target_rank=1, warmup=WARMUP,
                                   final=FINAL, interval=INTERVAL, agree=agree)
    infos = train(model, adamw(model), controller, batches(T))
    assert len(seen) == sum(i.pruned for i in infos) > 1
    assert all(layer.rank == 1 and layer.index.tolist() == [3] for layer in adapter_layers(model).values())


def test_a_needs_grad_scorer_is_refused_a_step_without_gradients() -> None:
    """``needs_grad`` is read by the controller: a scorer that declares it is never handed layers
    without gradients (``plugin_movement`` would fail on ``None``); one that does not is fed anyway."""
    model = adapted_bert(0, dtype=torch.float32)
    mover = PruningController(model, make_scorer("plugin_movement"), "dora", T, target_rank=TARGET_RANK,
                              warmup=WARMUP, final=FINAL, interval=INTERVAL, compact=False)
    assert mover.scorer.needs_grad
    with pytest.raises(RuntimeError, match=r"scorer 'plugin_movement' needs gradients but layer "
                                           r"'bert\.encoder\.layer\.0\.attention\.self\.query' has none: call "
                                           r"controller\.step\(\) after optimizer\.step\(\) and before"):
        mover.step()  # no backward yet
    assert mover.t == 0 and not mover.scorer.scores()
    assert mover.step(update_scores=False).step == 0  # a skipped step feeds nothing, so needs nothing
    weights_only = PruningController(model, make_scorer("magnitude"), "dora", T, target_rank=TARGET_RANK,
                                     warmup=WARMUP, final=FINAL, interval=INTERVAL, compact=False)
    assert not weights_only.scorer.needs_grad
    weights_only.step()
    assert len(weights_only.scorer.scores()) == 12


def test_build_controller_maps_the_run_config() -> None:
    """``build_controller`` is the one mapping of a run config onto the controller: every block's
    value arrives, and a budget the model cannot reach is a ConfigError naming the run."""
    from dora_lab.run.config import build_controller, load_config
    from dora_lab.run.config_yaml import ConfigError

    model = adapted_bert(0)
    cfg = load_config(None, ["scorer.name=magnitude", "schedule.name=linear", "schedule.warmup=2",
                             "schedule.final=3", "schedule.interval=2", "budget.target_rank=1.5",
                             "regularizer.name=null", "schedule.compact=false"])
    c = build_controller(cfg, model, 20)
    assert (c.schedule.warmup_steps, c.schedule.final_steps, c.schedule.interval, c.schedule.target) == (2, 3, 2, 18)
    assert c.scorer.name == "magnitude" and c.regularizer is None and not c.compact_at_end
    with pytest.raises(ConfigError, match=r"do not fit this run \(20 optimizer steps, 12 adapted matrices\)"):
        build_controller(load_config(None, ["adapter.r0=8", "budget.target_rank=5"]), model, 20)


@pytest.mark.parametrize("scorer_name", ["magnitude", "sensitivity"])
def test_steps_between_prune_steps_do_not_count_the_masks_again(scorer_name: str) -> None:
    """The active sizes a step reports come from each layer's cached count, made when the controller
    is built and again only after a prune step changed a mask: on a GPU every count is a host-device
    synchronisation (tests/test_cuda.py checks the same with CUDA's sync debug mode)."""
    from conftest import adapted_decoder, lm_batches

    model = adapted_decoder("llama", dtype=torch.float32, dropout=0.1).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl = PruningController(model, make_scorer(scorer_name), "dora", 20, target_rank=2, warmup=2, final=4,
                            interval=5)
    caches = {n: layer.__dict__.get("_active_cache") for n, layer in ctl.layers.items()}
    assert all(c is not None for c in caches.values())  # counted at construction
    for x, y in lm_batches(4):
        prune = ctl.schedule.is_prune_step(ctl.t)
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        ctl.step(opt)
        opt.zero_grad(set_to_none=True)
        now = {n: layer.__dict__.get("_active_cache") for n, layer in ctl.layers.items()}
        if not prune:
            assert all(now[n] is caches[n] for n in now), "a step without pruning counted a mask again"
        caches = now


@pytest.mark.parametrize("after_freeze", [False, True])
def test_a_method_acts_after_the_freeze_only_when_it_declares_so(after_freeze: bool) -> None:
    """The protocol, not a method: after the masks freeze the controller calls after_optimizer_step
    only for a method with acts_after_freeze (SoRA's proximal step), and never decide again."""
    from dora_lab import AllocationMethod

    class Recording(AllocationMethod):
        follows_schedule = True
        acts_after_freeze = after_freeze

        def __init__(self) -> None:
            self.stepped: list[tuple[int, bool]] = []
            self.decided: list[int] = []

        def after_optimizer_step(self, t: int, optimizer: torch.optim.Optimizer | None, update_scores: bool) -> None:
            self.stepped.append((t, self.ctl.frozen))

        def decide(self, t: int, update_scores: bool) -> dict[str, torch.Tensor] | None:
            self.decided.append(t)
            return self.active_keep() if self.ctl.schedule.is_final_step(t) else None

    model = adapted_bert(0)
    method = Recording()
    controller = PruningController(model, make_scorer("magnitude"), "linear", T, target_rank=4, warmup=WARMUP,
                                   final=FINAL, interval=INTERVAL, method=method)
    train(model, adamw(model), controller, batches(T))
    freeze = T - FINAL  # step 9 freezes
    assert method.decided == list(range(freeze + 1))
    after = [(t, True) for t in range(freeze + 1, T)] if after_freeze else []
    assert method.stepped == [(t, False) for t in range(freeze + 1)] + after
