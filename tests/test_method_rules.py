"""Each built-in allocation method (methods/) against a hand-worked case or its paper's formula."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import adamw, adapted_bert, adapted_decoder, batches, logits, randomize_c, train

from dora_lab import PruningController, RankOneLinear, Scorer, adapter_layers, make_method, make_scorer
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides


def layers(names: str = "abc", d_in: int = 5, d_out: int = 4, r0: int = 3) -> dict[str, RankOneLinear]:
    torch.manual_seed(0)
    return {n: RankOneLinear(torch.nn.Linear(d_in, d_out).double(), r0=r0, dropout=0.0) for n in names}


class Fixed(Scorer):
    """Scores set by hand (a real Scorer, fed nothing)."""

    name = "fixed"

    def __init__(self, scores: Mapping[str, list[float]]) -> None:
        self.values = {n: torch.tensor(v) for n, v in scores.items()}

    def update(self, layers: Mapping[str, Any]) -> None:
        del layers

    def scores(self) -> dict[str, torch.Tensor]:
        return dict(self.values)


# -- SoRA ------------------------------------------------------------------------------------------------
def test_sora_soft_thresholds_each_gate_by_its_learning_rate_times_lambda() -> None:
    lay = layers("x", r0=4)
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                            interval=1, method=make_method("sora", lam=0.1))
    x = lay["x"]
    x.c.data = torch.tensor([0.5, -0.002, 0.001, -0.3], dtype=torch.float64)
    opt = torch.optim.SGD([{"params": [x.A, x.B], "lr": 0.5}, {"params": [x.c], "lr": 0.01}])
    ctl.method.after_optimizer_step(0, opt, True)
    # c <- sign(c) max(|c| - 0.01 * 0.1, 0): c's own group's lr, not the other group's 0.5
    torch.testing.assert_close(x.c.detach(), torch.tensor([0.499, -0.001, 0.0, -0.299], dtype=torch.float64))


def test_sora_keeps_the_non_zero_gates_and_the_budget_caps_them() -> None:
    lay = layers("x", r0=4)
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                            interval=1, method=make_method("sora"))
    lay["x"].c.data = torch.tensor([0.4, 0.0, -0.2, 0.1], dtype=torch.float64)
    assert ctl.schedule.budget(1) == 4  # three non-zero gates, under the cap: all three kept
    assert ctl.method.decide(1, True)["x"].tolist() == [True, False, True, True]  # type: ignore[index]
    # the last prune step (T - t_f = 8) caps at the target, 2: the two largest |c|
    assert ctl.method.decide(8, True)["x"].tolist() == [True, False, True, False]  # type: ignore[index]
    lay["x"].c.data.zero_()
    with pytest.raises(RuntimeError, match=r"kept no component.*method.params.threshold"):
        ctl.method.decide(8, True)


def test_sora_in_a_run_zeroes_gates_and_ends_with_the_non_zero_ones() -> None:
    """The lr-scaled departure (lam) from dora_lab's zero gates: some gates stay at zero."""
    model = adapted_bert(0, dtype=torch.float32)
    ctl = PruningController(model, make_scorer("magnitude"), "dora", 12, target_rank=3, warmup=2, final=3,
                            interval=2, method=make_method("sora", lam=0.5, gate_init="zero"))
    train(model, adamw(model, lr=1e-2), ctl, batches(12))
    kept = sum(ctl.allocation().values())
    assert 0 < kept < 36  # lam 0.5 takes back half of a typical Adam step: some gates stay at zero (22)
    layers_ = adapter_layers(model).values()
    assert sum(layer.rank for layer in layers_) == kept  # compacted to the gates non-zero at the freeze,
    assert sum(int((layer.c != 0).sum()) for layer in layers_) < kept  # which the proximal step then goes on shrinking


def test_sora_thresholds_the_gates_by_xi_at_every_step_also_after_the_freeze() -> None:
    """The official SparseAdamW: after each optimizer step c <- sign(c) max(|c| - xi, 0) with a fixed
    xi, for the whole run; the gates start as the official lora.py's torch.randn, with B = 0."""
    lay = layers("ab", r0=3)
    torch.manual_seed(11)
    expected_start = {n: torch.randn(3, dtype=torch.float32).double() for n in "ab"}
    torch.manual_seed(11)
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=4,
                            interval=1, method=make_method("sora", xi=0.05))
    for n, x in lay.items():
        torch.testing.assert_close(x.c.detach(), expected_start[n], rtol=0, atol=0)
        assert not bool(x.B.any())
    opt = torch.optim.SGD([p for x in lay.values() for p in x.parameters() if p.requires_grad], lr=0.1)
    inputs = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    after_freeze = 0
    for _ in range(10):
        opt.zero_grad()
        sum(x(inputs).pow(2).mean() for x in lay.values()).backward()
        opt.step()
        stepped = {n: x.c.detach().clone() for n, x in lay.items()}
        was_frozen = ctl.frozen
        ctl.step(opt)
        if ctl.frozen and not was_frozen:
            continue  # the freeze step compacts c
        after_freeze += was_frozen
        for n, x in lay.items():
            c = stepped[n]
            torch.testing.assert_close(x.c.detach(), c.sign() * (c.abs() - 0.05).clamp_min(0), rtol=0, atol=0)
    assert after_freeze == 3 and ctl.frozen  # steps 7, 8, 9 after the freeze at T - final = 6
    gates = {n: x.c.detach().clone() for n, x in lay.items()}
    ctl.method.after_optimizer_step(10, opt, False)  # a step fp16 loss scaling skipped: no threshold either
    assert all(torch.equal(x.c.detach(), gates[n]) for n, x in lay.items())


# -- IncreLoRA ------------------------------------------------------------------------------------------
def increlora(target_rank: float, scores: Mapping[str, list[float]], **params: Any) -> PruningController:
    """Layer importance from hand-set component scores: the ``importance: scorer`` option."""
    return PruningController(layers(), Fixed(scores), "linear", 10, target_rank=target_rank, warmup=1, final=2,
                             interval=1, method=make_method("increlora", importance="scorer", **params))


def test_increlora_grows_the_layer_with_the_largest_official_module_score() -> None:
    """Two steps, then one grow decision: the layer is the argmax of the official smoothed module
    score, computed here from each layer's dW (from A, B, c and the reserve gate) and dL/d(dW) by
    autograd on a dense reference (dW a leaf), not from the component scorer."""
    ctl = PruningController(layers(), make_scorer("magnitude"), "linear", 10, target_rank=2, warmup=1, final=2,
                            interval=1, method=make_method("increlora", warmup=4))
    weight = {"a": 0.01, "b": 1.0, "c": 3.0}  # the loss leans on c; a has the largest gate, so by magnitude it wins
    for n, lay in ctl.layers.items():
        lay.c.data[0] = {"a": 3.0, "b": 0.5, "c": 0.4}[n]
    opt = torch.optim.SGD([p for lay in ctl.layers.values() for p in lay.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(5)
    avg = {n: 0.0 for n in weight}
    unc = {n: 0.0 for n in weight}
    for t in range(2):
        x = torch.randn(7, 5, dtype=torch.float64, generator=gen)
        for n, lay in ctl.layers.items():  # the reference: W0 + dW with dW = scale * B diag(c m + reserve) A
            gates = lay.c.detach() * lay.mask + lay.reserve  # type: ignore[operator]
            dw = (lay.scale * (lay.B.detach() * gates) @ lay.A.detach()).requires_grad_()
            out = x @ (lay.base.weight.detach() + dw).T + lay.base.bias.detach()  # type: ignore[union-attr]
            (weight[n] * out.pow(2).sum()).backward()
            s = float((dw.detach() * dw.grad).abs().sum()) / (4 * 5) ** 0.5  # type: ignore[operator]
            avg[n] = 0.85 * avg[n] + 0.15 * s
            unc[n] = 0.85 * unc[n] + 0.15 * abs(s - avg[n])
        opt.zero_grad()
        sum(weight[n] * lay(x).pow(2).sum() for n, lay in ctl.layers.items()).backward()
        opt.step()
        ctl.method.after_optimizer_step(t, opt, True)
    expected = {n: avg[n] * unc[n] for n in weight}
    got = ctl.method.importance()  # type: ignore[attr-defined]
    for n in weight:
        assert got[n] == pytest.approx(expected[n], rel=1e-9)
    grown = max(expected, key=lambda n: expected[n])
    by_magnitude = make_method("increlora", importance="scorer")
    by_magnitude.ctl = ctl
    ctl.scorer.update(ctl.layers)
    assert grown == "c" and max(weight, key=lambda n: by_magnitude.importance()[n]) == "a"  # the rules disagree
    trained = ctl.layers["c"].A[1].detach().clone(), ctl.layers["c"].B[:, 1].detach().clone()
    keep = ctl.method.decide(5, True)  # linear: budget 4, one new component
    assert keep is not None and {n: int(k.sum()) for n, k in keep.items()} == {"a": 1, "b": 1, "c": 2}
    ctl.apply(keep, optimizer=opt)
    ctl.method.after_apply(5, keep)
    # it starts as the official code's promoted reserve: its trained A/B, c = the reserve's 1e-5
    c = ctl.layers["c"]
    assert torch.equal(c.A[1], trained[0]) and torch.equal(c.B[:, 1], trained[1]) and c.c[1].item() == 1e-5


def test_increlora_starts_small_and_adds_to_the_most_important_layers_first() -> None:
    ctl = increlora(7 / 3, {"a": [1, 0, 0], "b": [5, 0, 0], "c": [3, 0, 0]})
    assert ctl.allocation() == {"a": 1, "b": 1, "c": 1} and ctl.schedule.start == 3
    assert all(lay.hard_mask for lay in ctl.layers.values())
    keep = ctl.method.decide(8, True)  # the last step: budget 7, deficit 4 -> b, c, a, then b again
    assert keep is not None
    assert {n: k.tolist() for n, k in keep.items()} == {
        "a": [True, True, False], "b": [True, True, True], "c": [True, True, False]}


def test_increlora_warms_a_new_component_up_linearly() -> None:
    ctl = increlora(2, {"a": [1, 0, 0], "b": [2, 0, 0], "c": [3, 0, 0]}, warmup=4, advance=False)
    opt = torch.optim.SGD([p for lay in ctl.layers.values() for p in lay.parameters() if p.requires_grad], lr=0.1)
    keep = ctl.method.decide(5, True)  # linear: budget 3 + int(3 * 4/7) = 4 -> c (the most important)
    assert keep is not None and keep["c"].tolist() == [True, True, False]
    ctl.apply(keep, optimizer=opt)
    ctl.method.after_apply(5, keep)
    c = ctl.layers["c"]
    assert c.c[1].item() == 0.0 and c.mask.tolist() == [1.0, 1.0, 0.0]
    x = torch.randn(6, 5, dtype=torch.float64)
    for k in (1, 2):
        before = c.c.detach().clone()
        opt.zero_grad()
        sum(lay(x).pow(2).sum() for lay in ctl.layers.values()).backward()
        g = c.c.grad.detach().clone()  # type: ignore[union-attr]
        opt.step()
        ctl.method.after_optimizer_step(5 + k, opt, True)
        # the new component's k-th update is scaled by k / warmup; the old one's is SGD's own
        torch.testing.assert_close(c.c[1].detach(), before[1] - (k / 4) * 0.1 * g[1])
        torch.testing.assert_close(c.c[0].detach(), before[0] - 0.1 * g[0])
        assert g[2].item() == 0.0  # the inactive slot gets no gradient


def reference_out(lay: RankOneLinear, gates: list[float], x: torch.Tensor,
                  a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 x + b0 + scale sum_i g_i B[:, i] (A[i] . x)``, one component at a time."""
    a = lay.A.detach() if a is None else a
    b = lay.B.detach() if b is None else b
    out = x @ lay.base.weight.detach().T + lay.base.bias.detach()  # type: ignore[union-attr]
    for i, g in enumerate(gates):
        out = out + lay.scale * g * (x @ a[i])[:, None] * b[:, i][None, :]
    return out


def test_increlora_advance_learning_trains_a_reserve_ahead_and_adds_it_with_what_it_learned() -> None:
    ctl = increlora(2, {"a": [1, 0, 0], "b": [2, 0, 0], "c": [3, 0, 0]}, warmup=4)
    lr, gate = 0.01, 1e-5
    for lay in ctl.layers.values():  # one active component, the next slot the reserve with c = 1e-5
        assert lay.mask.tolist() == [1.0, 0.0, 0.0] and lay.reserve is not None
        assert lay.reserve.tolist() == [0.0, gate, 0.0]
        lay.c.data[0] = 0.5
    assert ctl.active_budget() == 3  # reserves are not counted
    opt = torch.optim.SGD([p for lay in ctl.layers.values() for p in lay.parameters() if p.requires_grad], lr=lr)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c = ctl.layers["c"]
    for t in range(3):
        a, b, c0 = c.A.detach().clone(), c.B.detach().clone(), c.c[0].item()
        # the reserve is in the forward pass with its gate: out = ref(c0, 1e-5, 0), a 1e-5-sized term
        torch.testing.assert_close(c(x), reference_out(c, [c0, gate, 0.0], x), rtol=1e-12, atol=1e-14)
        term = reference_out(c, [c0, gate, 0.0], x) - reference_out(c, [c0, 0.0, 0.0], x)
        assert 0 < float(term.abs().max()) < 1e-4
        # the gradient of its A row and B column, by autograd on the reference formula (c fixed)
        ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
        reference_out(c, [c0, gate, 0.0], x, ra, rb).pow(2).sum().backward()
        opt.zero_grad()
        sum(lay(x).pow(2).sum() for lay in ctl.layers.values()).backward()
        assert c.c.grad is not None and c.c.grad[1].item() == 0.0  # its c does not train
        opt.step()
        ctl.method.after_optimizer_step(t, opt, True)
        # no warm-up for the reserves drawn at the start (the run's own schedule warms them up)
        torch.testing.assert_close(c.A[1].detach(), a[1] - lr * ra.grad[1], rtol=1e-12, atol=1e-15)  # type: ignore[index]
        torch.testing.assert_close(c.B[:, 1].detach(), b[:, 1] - lr * rb.grad[:, 1], rtol=1e-12, atol=1e-15)  # type: ignore[index]
        assert c.c[1].item() == 0.0 and c.active_rank == 1
    trained = {n: (lay.A[1].detach().clone(), lay.B[:, 1].detach().clone()) for n, lay in ctl.layers.items()}
    slot2 = c.A[2].detach().clone()
    out = c(x).detach()
    keep = ctl.method.decide(5, True)  # budget 4: one more component, for c (the most important)
    assert keep is not None and keep["c"].tolist() == [True, True, False]
    ctl.apply(keep, optimizer=opt)
    ctl.method.after_apply(5, keep)
    # added: the reserve with the A/B it learned and c = its gate; a fresh reserve drawn in slot 2
    assert torch.equal(c.A[1], trained["c"][0]) and torch.equal(c.B[:, 1], trained["c"][1])
    assert c.c[1].item() == gate and c.mask.tolist() == [1.0, 1.0, 0.0] and c.reserve is not None
    assert c.reserve.tolist() == [0.0, 0.0, gate] and not torch.equal(c.A[2], slot2) and c.c[2].item() == 0.0
    # the output moves only by the new reserve's 1e-5 term
    torch.testing.assert_close(c(x).detach() - out, reference_out(c, [0, 0, gate], x) - reference_out(c, [0, 0, 0], x),
                               rtol=1e-9, atol=1e-15)
    for n in "ab":  # the other layers' reserves go on as they were
        lay = ctl.layers[n]
        assert lay.reserve is not None and lay.reserve.tolist() == [0.0, gate, 0.0] and lay.active_rank == 1
        assert torch.equal(lay.A[1], trained[n][0])
    # restart warm-up: the added component's c and the new reserve's A/B step at 1/4 of SGD's; its A/B at SGD's
    before = c.c.detach().clone(), c.A.detach().clone()
    opt.zero_grad()
    sum(lay(x).pow(2).sum() for lay in ctl.layers.values()).backward()
    g_c, g_a = c.c.grad.detach().clone(), c.A.grad.detach().clone()  # type: ignore[union-attr]
    opt.step()
    ctl.method.after_optimizer_step(6, opt, True)
    torch.testing.assert_close(c.c[1].detach(), before[0][1] - (1 / 4) * lr * g_c[1])
    torch.testing.assert_close(c.A[1].detach(), before[1][1] - lr * g_a[1])
    torch.testing.assert_close(c.A[2].detach(), before[1][2] - (1 / 4) * lr * g_a[2])
    assert bool((g_a[2] != 0).all())


def test_increlora_resumes_with_its_reserves() -> None:
    """Stop after a grow step, restore into a fresh model, finish: equal to an uninterrupted run."""
    def start(seed: int) -> tuple[torch.nn.Module, PruningController, torch.optim.Optimizer]:
        model = adapted_bert(seed)
        ctl = PruningController(model, make_scorer("sensitivity"), "linear", 12, target_rank=3, warmup=2, final=3,
                                interval=2, method=make_method("increlora", warmup=3))
        return model, ctl, adamw(model)

    whole, whole_ctl, whole_opt = start(0)
    train(whole, whole_opt, whole_ctl, batches(12))
    model, ctl, opt = start(0)
    train(model, opt, ctl, batches(12)[:5])  # grow steps 2 and 4 done, warm-ups under way
    buffer = io.BytesIO()
    torch.save((ctl.state_dict(), model.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    state, weights, opt_state = torch.load(buffer, weights_only=True)
    moved = {n: int(lay.reserve.nonzero()) for n, lay in ctl.layers.items() if lay.reserve is not None}
    assert set(moved.values()) == {1, 2}  # grown layers drew their reserve in a later slot
    fresh, fresh_ctl, fresh_opt = start(3)
    fresh_ctl.load_state_dict(state)
    fresh.load_state_dict(weights)
    fresh_opt.load_state_dict(opt_state)
    assert {n: int(lay.reserve.nonzero()) for n, lay in fresh_ctl.layers.items() if lay.reserve is not None} == moved
    train(fresh, fresh_opt, fresh_ctl, batches(12)[5:])
    assert fresh_ctl.allocation() == whole_ctl.allocation() and fresh_ctl.frozen
    assert all(lay.reserve is None for lay in fresh_ctl.layers.values())  # the final mask ends them
    probe = batches(2, seed=7)
    torch.testing.assert_close(logits(fresh, probe), logits(whole, probe), rtol=0, atol=1e-10)


def test_increlora_resumes_from_the_older_warm_up_state_layout() -> None:
    """A checkpoint of the layout before one warm-up mechanism (warm_ab: slots, count, A rows, B
    columns; warm_c: slots, count, c) resumes to the same weights as an uninterrupted run."""
    def start() -> tuple[torch.nn.Module, PruningController, torch.optim.Optimizer]:
        model = adapted_bert(0)
        ctl = PruningController(model, make_scorer("sensitivity"), "linear", 12, target_rank=3, warmup=2, final=3,
                                interval=2, method=make_method("increlora", warmup=5))
        return model, ctl, adamw(model)

    whole, whole_ctl, whole_opt = start()
    train(whole, whole_opt, whole_ctl, batches(12))
    model, ctl, opt = start()
    train(model, opt, ctl, batches(12)[:5])
    state = ctl.state_dict()
    warm = state["method"]["warm"]
    assert warm["A"] and warm["c"]  # warm-ups under way
    state["method"] = {"warm_ab": {n: (i, k, a, warm["B"][n][2]) for n, (i, k, a) in warm["A"].items()},
                       "warm_c": warm["c"], "reserve": state["method"]["reserve"],
                       "module_score": state["method"]["module_score"]}
    ctl.load_state_dict(state)
    train(model, opt, ctl, batches(12)[5:])
    torch.testing.assert_close(logits(model, batches(2, seed=7)), logits(whole, batches(2, seed=7)), rtol=0, atol=0)


# -- DyLoRA ---------------------------------------------------------------------------------------------
def test_dylora_trains_only_the_drawn_prefix_and_evaluates_with_all() -> None:
    model = adapted_bert(0)
    randomize_c(model)
    ctl = PruningController(model, make_scorer("magnitude"), "dora", 12, target_rank=1.5, warmup=2, final=3,
                            interval=2, method=make_method("dylora", seed=3))
    b = ctl.method.draws[0]  # type: ignore[attr-defined]
    assert 1 <= b <= 4
    x, y = batches(1)[0]
    model.train()
    model(input_ids=x, labels=y).loss.backward()
    for lay in adapter_layers(model).values():
        assert lay.prefix == b
        assert bool((lay.A.grad[b:] == 0).all()) and bool((lay.c.grad[b:] == 0).all())  # type: ignore[index]
        assert bool((lay.A.grad[:b] != 0).any())  # type: ignore[index]
        lay.eval()
        assert bool((lay.effective_c() == lay.c).all())
    again = make_method("dylora", seed=3)
    PruningController(adapted_bert(0), make_scorer("magnitude"), "dora", 12, target_rank=1.5, warmup=2, final=3,
                      interval=2, method=again)
    assert again.draws == [b]  # type: ignore[attr-defined]


def test_dylora_cuts_every_layer_to_a_prefix_that_meets_the_target() -> None:
    for budget, expected in (({"target_rank": 1.5}, [2] * 6 + [1] * 6),
                             # 908 parameters per component in every layer (4 x 65 + 2 x 97): 3 each = 2724,
                             # then one more (65) for layer 0's query, key, value, output: 2984; 3081 > 3000
                             ({"target_params": 3000}, [4] * 4 + [3] * 8)):
        model = adapted_bert(0, dtype=torch.float32)
        ctl = PruningController(model, make_scorer("magnitude"), "dora", 12, warmup=2, final=3, interval=2,
                                method=make_method("dylora"), **budget)  # type: ignore[arg-type]
        infos = train(model, adamw(model), ctl, batches(12))
        assert list(ctl.allocation().values()) == expected
        assert [i.pruned for i in infos] == [t == 9 for t in range(12)]
        assert all(lay.prefix is None and lay.index.tolist() == list(range(lay.rank))
                   for lay in ctl.layers.values())


# -- EVA (one-shot) -------------------------------------------------------------------------------------
def test_eva_ratios_and_directions_are_the_centred_real_tokens_principal_components() -> None:
    """Padding (attention_mask 0, filled with 100s here) is left out and the tokens are centred:
    the ratios and directions are the SVD of the centred real tokens, and PEFT's own
    IncrementalPCA (what its EVA runs) gives the same numbers."""
    from peft.utils.incremental_pca import IncrementalPCA

    lay = layers("x", d_in=5, r0=3)
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                            method=make_method("eva", batches=2))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):  # the third is not read
        x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) + torch.tensor([4.0, 0, 0, -2, 0])
        mask = torch.ones(3, 4, dtype=torch.long)
        mask[0, 2:], mask[2, 3] = 0, 0
        x[mask == 0] = 100.0
        data.append({"x": x, "attention_mask": mask})
    ctl.before_training(lambda b: lay["x"](b["x"]), data)
    rows = torch.cat([d["x"][d["attention_mask"].bool()] for d in data[:2]])
    assert rows.shape == (18, 5) and float(rows.max()) < 100
    _, s, vh = torch.linalg.svd(rows - rows.mean(0))
    ratios = ctl.method.ratios["x"]  # type: ignore[attr-defined]
    torch.testing.assert_close(ratios, (s[:3] ** 2 / (s**2).sum()).float())
    torch.testing.assert_close(lay["x"].A.detach().abs(), vh[:3].abs())  # up to sign
    assert lay["x"].mask.tolist() == [1.0, 1.0, 0.0] and lay["x"].hard_mask
    peft = IncrementalPCA(n_components=3, copy=True, lowrank=False).partial_fit(rows.clone())
    torch.testing.assert_close(ratios.double(), peft.explained_variance_ratio_, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lay["x"].A.detach().abs(), peft.components_.abs(), rtol=1e-6, atol=1e-7)


def test_eva_leaves_out_a_causal_batchs_masked_prompt_as_peft_does() -> None:
    """A tiny llama, a batch whose prompt positions are labelled -100 (and one padded row): the rows
    the SVD reads are those PEFT's EVA picks by default (its prepare_model_inputs_fn_language_modeling
    and prepare_layer_inputs_fn_language_modeling with use_label_mask=True); label_mask: false keeps
    the prompt (the real tokens only)."""
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import (
        prepare_layer_inputs_fn_language_modeling,
        prepare_model_inputs_fn_language_modeling,
    )

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    attention = torch.ones(3, 9, dtype=torch.long)
    attention[2, 7:] = 0  # padding
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 7:] = -100
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    peft_config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig())
    for label_mask, wanted_rows in ((True, 13), (False, 25)):
        model = adapted_decoder("llama", r0=3)
        model.eval()
        lay = adapter_layers(model)
        name = next(iter(lay))
        seen: list[torch.Tensor] = []
        handle = lay[name].register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0].detach()))
        ctl = PruningController(model, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                                method=make_method("eva", batches=1, **({} if label_mask else {"label_mask": False})))
        ctl.before_training(lambda b, model=model: model(**b), [batch])
        handle.remove()
        if label_mask:
            picked = prepare_model_inputs_fn_language_modeling(batch, peft_config)
            rows = prepare_layer_inputs_fn_language_modeling(seen[0], picked, name)
        else:
            rows = seen[0][attention.bool()]
        assert rows.shape[0] == wanted_rows  # 5 + 5 + 3 answer positions; or 9 + 9 + 7 real tokens
        _, s, vh = torch.linalg.svd(rows - rows.mean(0))
        torch.testing.assert_close(ctl.method.ratios[name], (s[:3] ** 2 / (s**2).sum()).float())  # type: ignore[attr-defined]
        torch.testing.assert_close(lay[name].A.detach().abs(), vh[:3].abs())  # up to sign


def test_eva_gives_the_budget_to_the_layers_whose_inputs_spread_most() -> None:
    lay = layers("pq", d_in=5, r0=3)
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, target_rank=1.5, warmup=1, final=2,
                            method=make_method("eva", batches=1))
    xp = torch.zeros(4, 5, dtype=torch.float64) + 7.0  # an offset: centring removes it
    xp[0, 0], xp[1, 0], xp[2, 1], xp[3, 1] = 10.0, 4.0, 8.0, 6.0  # ratios 0.9, 0.1, 0
    xq = torch.zeros(4, 5, dtype=torch.float64)
    xq[0, 0], xq[1, 0], xq[2, 1], xq[3, 1] = 2.0, -2.0, 2.0, -2.0  # ratios 0.5, 0.5, 0
    ctl.before_training(lambda b: (lay["p"](b[0]), lay["q"](b[1])), [(xp, xq)])
    torch.testing.assert_close(ctl.method.ratios["p"], torch.tensor([0.9, 0.1, 0.0]))  # type: ignore[attr-defined]
    opt = torch.optim.AdamW([p for m in lay.values() for p in m.parameters() if p.requires_grad])
    info = ctl.step(opt)  # target 3: 0.9 (p), 0.5, 0.5 (q); frozen and compacted at step 0
    assert ctl.allocation() == {"p": 1, "q": 2} and info.frozen and info.pruned
    torch.testing.assert_close(lay["p"].A.detach().abs(), torch.eye(5, dtype=torch.float64)[:1])


def test_eva_without_calibration_batches_says_so() -> None:
    lay = layers("x")
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                            method=make_method("eva"))
    with pytest.raises(RuntimeError, match="call controller.before_training"):
        ctl.step(torch.optim.AdamW(lay["x"].parameters()))


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
@pytest.mark.parametrize("method", ["eva", "fisher", "increlora", "sora", "dylora", "alora"])
def test_a_training_run_uses_the_configured_method(method: str, tmp_path: Path) -> None:
    from dora_lab.run.config import load_config
    from dora_lab.run.train import train_run

    tiny = make_tiny_model_dir(tmp_path / "bert")
    cfg = load_config(REPO / "configs" / "cola.yaml", [*tiny_overrides(tiny, tmp_path), f"method.name={method}",
                                                       "train.max_steps=8", "train.lr=5e-3"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert 0 < result.active_components_final <= 2 * 12
    if method != "sora":
        assert result.active_components_final == 2 * 12
    curve = json.loads((tmp_path / "run" / "budget.json").read_text())["curve"]
    assert len(curve) == 8 and curve[-1] == 2 * 12


# -- ALoRA ----------------------------------------------------------------------------------------------
def alora_setup(swap: int = 1, seed: int = 1, **params: Any) -> tuple[PruningController, torch.Tensor]:
    lay = layers("abc", r0=3)
    g = torch.Generator().manual_seed(seed)
    for i, m in enumerate(lay.values()):
        m.c.data = torch.randn(3, generator=g, dtype=torch.float64) * (i + 1)
    ctl = PruningController(lay, make_scorer("magnitude"), "linear", 10, target_rank=4 / 3, warmup=1, final=2,
                            interval=1, method=make_method("alora", swap=swap, **params))
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randn(8, 4, generator=g, dtype=torch.float64)
    ctl.set_validation(lambda: float(sum(((m(x) - y) ** 2).mean() for m in lay.values()).detach()))
    return ctl, x


def test_alora_two_term_scores_are_the_loss_change_when_one_component_is_masked_out() -> None:
    ctl, x = alora_setup(score="two_term")
    # the start: the same rank everywhere, a prefix meeting the target (4 components: 2, 1, 1)
    assert ctl.allocation() == {"a": 2, "b": 1, "c": 1}
    scores = ctl.method.scores()  # type: ignore[attr-defined]
    loss = ctl.validation_loss
    assert loss is not None
    full = loss()
    for n, m in ctl.layers.items():
        for i in range(3):
            if m.mask[i] == 0:
                assert torch.isnan(scores[n][i])
                continue
            saved = m.c.detach().clone()
            with torch.no_grad():
                m.c[i] = 0.0  # another way to remove component i: its coefficient, not its mask
            assert scores[n][i].item() == pytest.approx(loss() - full, rel=1e-9, abs=1e-12)
            with torch.no_grad():
                m.c.copy_(saved)


def gates_only(ctl: PruningController, kept: set[tuple[str, int]]) -> float:
    """The validation loss with every component's c zeroed but ``kept``'s (not through the masks)."""
    saved = {n: m.c.detach().clone() for n, m in ctl.layers.items()}
    with torch.no_grad():
        for n, m in ctl.layers.items():
            for i in range(m.rank):
                if (n, i) not in kept:
                    m.c[i] = 0.0
    loss = ctl.validation_loss
    assert loss is not None
    try:
        return loss()
    finally:
        with torch.no_grad():
            for n, m in ctl.layers.items():
                m.c.copy_(saved[n])


def test_alora_paper_score_has_the_third_term_and_it_changes_the_pruned_component() -> None:
    """Eq. 6 with S = -L: IS(i) = L(without i) - L(all) - L(only i), "only i" the one component left in
    the whole network.  A hand-worked case, the validation loss sum_l mean(|out_l - y_l|^2) with y_l
    the base output plus a target update, U = the update of one unit component:
    a: two equal components, target 2U (each alone gets half: L = |U|^2);  b: one, 1.5^0.5 U, its
    target;  c: one, 10 U, its target.  Two-term: a_i = |U|^2, b = 1.5, c = 100: an a goes.  Paper:
    a_i = 1 - (1 + 1.5 + 100) = -101.5, b = 1.5 - (4 + 0 + 100) = -102.5, c = 100 - (4 + 1.5) = 94.5:
    b goes.  Every loss is also computed by zeroing gates by hand, not through the masks."""
    ctl, x = alora_setup()
    g = torch.Generator().manual_seed(9)
    u, v = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    gates = {"a": [1.0, 1.0], "b": [1.5 ** 0.5], "c": [10.0]}
    targets = {}
    with torch.no_grad():
        for n, m in ctl.layers.items():
            for i, gate in enumerate(gates[n]):
                m.A[i], m.B[:, i], m.c[i] = u, v, gate
            targets[n] = m(x).detach()  # the base output plus the full update: L(all) = 0
    ctl.set_validation(lambda: float(sum(((m(x) - targets[n]) ** 2).mean() for n, m in ctl.layers.items()).detach()))
    unit = float(((ctl.layers["a"].scale * (x @ u))[:, None] * v).pow(2).mean())  # |U|^2
    active = [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
    all_ = gates_only(ctl, set(active))
    two = {k: gates_only(ctl, set(active) - {k}) - all_ for k in active}
    paper = {k: two[k] - gates_only(ctl, {k}) for k in active}
    for k, want in {("a", 0): -101.5, ("a", 1): -101.5, ("b", 0): -102.5, ("c", 0): 94.5}.items():
        assert paper[k] == pytest.approx(want * unit, rel=1e-9)
    scores = ctl.method.scores()  # type: ignore[attr-defined]
    for (n, i), want in paper.items():
        assert scores[n][i].item() == pytest.approx(want, rel=1e-9)
    keep = ctl.method.decide(1, True)
    assert keep is not None and not keep["b"][0] and keep["a"][:2].all() and keep["c"][0]
    two_term = make_method("alora", swap=1, score="two_term")
    two_term.setup(ctl)
    assert {k: two_term.scores()[k[0]][k[1]].item() for k in active} == pytest.approx(  # type: ignore[attr-defined]
        {k: w * unit for k, w in {("a", 0): 1.0, ("a", 1): 1.0, ("b", 0): 1.5, ("c", 0): 100.0}.items()}, rel=1e-9)
    keep = two_term.decide(1, True)
    assert keep is not None and keep["b"][0] and not keep["a"][0]  # without the third term an a would go


def test_alora_prunes_the_lowest_and_gives_its_budget_to_the_most_important_layer() -> None:
    ctl, _ = alora_setup()
    scores = ctl.method.scores()  # type: ignore[attr-defined]
    active = sorted((float(s[i]), n, i) for n, s in scores.items() for i in range(3) if ctl.layers[n].mask[i] > 0)
    _, lowest_layer, lowest_i = active[0]
    keep = ctl.method.decide(1, True)
    assert keep is not None
    assert not keep[lowest_layer][lowest_i]
    others = [n for n in "abc" if n != lowest_layer]
    best = max(others, key=lambda n: float(scores[n][ctl.layers[n].mask > 0].mean()))
    assert int(keep[best].sum()) == ctl.allocation()[best] + 1  # the freed component went there
    assert sum(int(k.sum()) for k in keep.values()) == 4  # the cap, unchanged
    opt = torch.optim.AdamW([p for m in ctl.layers.values() for p in m.parameters() if p.requires_grad])
    ctl.apply(keep, optimizer=opt)
    new = int(torch.nonzero(keep[best] & (torch.arange(3) >= ctl.allocation()[best] - 1)).flatten()[-1])
    assert ctl.layers[best].c[new].item() == 0.0 and ctl.layers[best].hard_mask  # a fresh component


def test_alora_without_a_validation_loss_says_how_to_give_one() -> None:
    lay = layers("ab")
    ctl = PruningController(lay, make_scorer("magnitude"), "linear", 10, target_rank=1, warmup=1, final=2,
                            interval=1, method=make_method("alora"))
    with pytest.raises(RuntimeError, match=r"controller.set_validation"):
        ctl.method.decide(1, True)


def test_a_validation_method_for_a_task_without_evaluation_data_is_refused(tmp_path: Path) -> None:
    from dora_lab.run.config import load_config
    from dora_lab.run.config_yaml import ConfigError
    from dora_lab.run.tasks import TASKS, TaskSpec, register_task

    register_task(TaskSpec(name="no_eval_task", text_fields=("sentence",), num_labels=2, is_regression=False,
                           main_metric="accuracy", eval_splits=(), hub_path=None))
    try:
        with pytest.raises(ConfigError, match=r"method.name: method 'alora' scores components on a validation "
                                              r"batch, but task 'no_eval_task' has no evaluation split"):
            load_config(REPO / "configs" / "cola.yaml", ["method.name=alora", "task.name=no_eval_task"])
    finally:
        TASKS.remove("no_eval_task")


def test_alora_re_allocates_at_every_nth_prune_step_and_freezes_at_the_last() -> None:
    lay = layers("ab")
    ctl = PruningController(lay, make_scorer("magnitude"), "linear", 10, target_rank=1, warmup=1, final=2,
                            interval=1, method=make_method("alora", every=2))
    ctl.set_validation(lambda: float(sum(m(torch.ones(2, 5, dtype=torch.float64)).sum() for m in lay.values())))
    assert [ctl.method.decide(t, True) is not None for t in range(1, 9)] == [True, False, True, False, True,
                                                                             False, True, True]
