"""Scorers: the shared matrix over every registered scorer, and each built-in against an
independent computation (a slow materialising reference, a hand computation, PEFT's AdaLoRA)."""

from __future__ import annotations

import pytest
import torch
from conftest import adamw, adapted_bert, batches, randomize_c, slow_magnitude, tiny_bert, train
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

import dora_lab
from dora_lab import PruningController, RankOneLinear, adapter_layers, get_scorer, make_scorer
from dora_lab.core.adapter import DEFAULT_TARGETS


def scored_run(scorer_name: str, seed: int, steps: int = 3) -> tuple[dict[str, RankOneLinear], dict]:
    """Train a few steps, calling ``scorer.update`` where the controller would (grads present)."""
    model = adapted_bert(seed, dtype=torch.float32)
    layers = adapter_layers(model)
    scorer = make_scorer(scorer_name)
    train(model, adamw(model), None, batches(steps, seed), before_step=lambda i: scorer.update(layers))
    return layers, scorer.scores()


# -- the shared matrix --------------------------------------------------------------------------------
def test_scores_have_one_finite_non_negative_value_per_component(scorer_name: str) -> None:
    layers, scores = scored_run(scorer_name, seed=0)
    assert list(scores) == list(layers)
    for name, layer in layers.items():
        s = scores[name]
        assert s.shape == (layer.rank,), name
        assert s.is_floating_point()
        assert torch.isfinite(s).all() and (s >= 0).all(), (name, s)
    assert sum(float(s.sum()) for s in scores.values()) > 0, "every score is zero"


def test_scores_are_deterministic_for_a_seed(scorer_name: str) -> None:
    _, first = scored_run(scorer_name, seed=0)
    _, again = scored_run(scorer_name, seed=0)
    _, other = scored_run(scorer_name, seed=1)
    for name in first:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert any(not torch.equal(first[n], other[n]) for n in first), "scores ignore the weights/data"


# -- magnitude ----------------------------------------------------------------------------------------
def test_magnitude_matches_materialised_reference_with_ema() -> None:
    model = adapted_bert(0)
    randomize_c(model)
    layers = adapter_layers(model)
    with torch.no_grad():  # a soft-pruned component: c_i = 0 gives score 0 at this step
        next(iter(layers.values())).c[1] = 0.0
    scorer = make_scorer("magnitude")
    assert scorer.beta == 0.9  # type: ignore[attr-defined]
    ema = {n: torch.zeros(layer.rank, dtype=torch.float64) for n, layer in layers.items()}
    checked = []

    def check(step: int) -> None:
        scorer.update(layers)
        for name, layer in layers.items():
            ema[name] = 0.9 * ema[name] + 0.1 * slow_magnitude(layer)
            torch.testing.assert_close(scorer.scores()[name].double(), ema[name], rtol=1e-5, atol=1e-7)
        checked.append(step)

    first = next(iter(layers.values()))
    torch.testing.assert_close(slow_magnitude(first)[1], torch.tensor(0.0, dtype=torch.float64))
    train(model, adamw(model), None, batches(5), before_step=check)
    assert checked == [0, 1, 2, 3, 4]


def test_magnitude_without_smoothing_is_the_share_of_the_update() -> None:
    model = adapted_bert(0)
    randomize_c(model, seed=3)
    layers = adapter_layers(model)
    scorer = make_scorer("magnitude", beta=None)
    for _ in range(2):  # no EMA: the same weights give the same scores twice
        scorer.update(layers)
    for name, layer in layers.items():
        torch.testing.assert_close(scorer.scores()[name].double(), slow_magnitude(layer), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cancel", [1e-2, 1e-3])
def test_magnitude_is_exact_when_components_nearly_cancel(cancel: float) -> None:
    """Pairs of components that undo each other up to ``cancel``: ||dW|| is about ``cancel`` times
    the summed component norms, and the closed form must still match the materialised one."""
    torch.manual_seed(0)
    layer = RankOneLinear(nn.Linear(96, 80), r0=8)
    with torch.no_grad():
        for i in range(0, 8, 2):  # component i+1 = -(component i) + a small perturbation
            layer.B[:, i + 1] = -layer.B[:, i] + cancel * torch.randn(80) * layer.B[:, i].norm() / 80**0.5
            layer.A[i + 1] = layer.A[i]
        layer.c.fill_(1.0)
    reference = slow_magnitude(layer)
    a, b = layer.A.detach().double(), layer.B.detach().double()
    summed = float(sum(torch.linalg.norm(torch.outer(b[:, i], a[i])) for i in range(8)))
    assert float((b @ a).norm()) < 2 * cancel * summed  # it does cancel
    scorer = make_scorer("magnitude", beta=None)
    scorer.update({"layer": layer})
    torch.testing.assert_close(scorer.scores()["layer"].double(), reference, rtol=1e-5, atol=0)


# -- sensitivity --------------------------------------------------------------------------------------
def hand_sensitivity(layer: RankOneLinear) -> torch.Tensor:
    """``I(c_i) + mean_j I(A[i,j]) + mean_j I(B[j,i])`` with ``I = |theta grad|``, element by element."""
    a, b, c = layer.A.tolist(), layer.B.tolist(), layer.c.tolist()
    ga, gb, gc = layer.A.grad.tolist(), layer.B.grad.tolist(), layer.c.grad.tolist()  # type: ignore[union-attr]
    out = []
    for i in range(layer.rank):
        i_c = abs(c[i] * gc[i])
        i_a = sum(abs(a[i][j] * ga[i][j]) for j in range(layer.in_features)) / layer.in_features
        i_b = sum(abs(b[j][i] * gb[j][i]) for j in range(layer.out_features)) / layer.out_features
        out.append(i_c + i_a + i_b)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [None, 0.5])
def test_sensitivity_matches_hand_computation(beta: float | None) -> None:
    model = adapted_bert(0)
    randomize_c(model)
    layers = adapter_layers(model)
    scorer = make_scorer("sensitivity", beta=beta)
    ema: dict[str, torch.Tensor] = {}

    def check(step: int) -> None:
        scorer.update(layers)
        for name, layer in layers.items():
            raw = hand_sensitivity(layer)
            ema[name] = raw if beta is None else beta * ema.get(name, torch.zeros_like(raw)) + (1 - beta) * raw
            assert (raw > 0).all()
            torch.testing.assert_close(scorer.scores()[name].double(), ema[name], rtol=1e-5, atol=1e-9)

    train(model, adamw(model), None, batches(3), before_step=check)


def test_gradient_scorers_refuse_to_run_without_gradients() -> None:
    layers = adapter_layers(adapted_bert(0))
    for name in ("sensitivity", "smoothed_uncertainty"):
        with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
            make_scorer(name).update(layers)


# -- smoothed_uncertainty against PEFT's AdaLoRA RankAllocator -----------------------------------------
def peft_adalora(init_r: int) -> tuple[torch.nn.Module, RankAllocator]:
    config = AdaLoraConfig(
        init_r=init_r, target_r=2, total_step=20, tinit=2, tfinal=5, deltaT=1, beta1=0.85, beta2=0.85,
        target_modules=list(DEFAULT_TARGETS["bert"]), lora_alpha=8,
    )
    model = get_peft_model(tiny_bert(5), config).double()
    return model, RankAllocator(model, config, "default")


def peft_component_scores(allocator: RankAllocator, key: str) -> torch.Tensor:
    """PEFT's own per-triplet score, built the way ``RankAllocator.mask_to_budget`` builds it."""
    ipt_a = torch.mean(allocator._element_score(key % "lora_A"), dim=1, keepdim=True)
    ipt_b = torch.mean(allocator._element_score(key % "lora_B"), dim=0, keepdim=False).view(-1, 1)
    ipt_e = allocator._element_score(key % "lora_E")
    return allocator._combine_ipt(ipt_e, torch.cat([ipt_a, ipt_b], dim=1))


def test_smoothed_uncertainty_matches_peft_rank_allocator() -> None:
    model = adapted_bert(0, r0=4)
    randomize_c(model)
    layers = adapter_layers(model)
    pmodel, allocator = peft_adalora(init_r=4)
    pparams = dict(pmodel.named_parameters())
    keys = {n: f"base_model.model.{n}.%s.default" for n in layers}
    assert sum(1 for k in pparams if ".lora_E." in k) == len(layers)  # the same 12 linears
    scorer = make_scorer("smoothed_uncertainty")

    def feed_both(step: int) -> None:
        for name, layer in layers.items():
            for ours, kind in ((layer.A, "lora_A"), (layer.B, "lora_B"), (layer.c, "lora_E")):
                p = pparams[keys[name] % kind]
                with torch.no_grad():
                    p.copy_(ours.detach().view_as(p))
                p.grad = ours.grad.detach().clone().view_as(p)  # type: ignore[union-attr]
        allocator.update_ipt(pmodel)
        scorer.update(layers)
        ours_now = scorer.scores()
        for name in layers:
            theirs = peft_component_scores(allocator, keys[name])
            assert theirs.abs().max() > 0
            torch.testing.assert_close(ours_now[name].double(), theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))

    train(model, adamw(model), None, batches(5), before_step=feed_both)

    # The global ranking agrees too: PEFT's threshold mask for a budget equals our top-budget decision.
    budget = 30
    controller = PruningController(model, scorer, "adalora", 20, target_rank=2, warmup=2, final=5)
    keep = controller.decide(budget)
    pattern = allocator.mask_to_budget(pmodel, budget)
    assert sum(int(k.sum()) for k in keep.values()) == budget
    for name in layers:
        assert keep[name].tolist() == pattern[keys[name] % "lora_E"], name


def test_smoothed_uncertainty_recurrence_by_hand() -> None:
    """Two steps of ``Ibar``/``Ubar`` written out for one element: the EMAs start at zero and the
    uncertainty uses the ``Ibar`` just updated."""
    layer = RankOneLinear(torch.nn.Linear(1, 1, bias=False).double(), r0=1, dropout=0.0)
    scorer = make_scorer("smoothed_uncertainty", beta1=0.5, beta2=0.75)
    sens = []
    for theta, grad in ((2.0, 3.0), (1.0, -1.0)):
        with torch.no_grad():
            layer.A.fill_(1.0)
            layer.B.fill_(1.0)
            layer.c.fill_(theta)
        for p in (layer.A, layer.B):
            p.grad = torch.zeros_like(p)
        layer.c.grad = torch.full_like(layer.c, grad)
        scorer.update({"l": layer})
        sens.append(abs(theta * grad))
    ibar1 = 0.5 * sens[0]  # 3
    ubar1 = 0.25 * abs(sens[0] - ibar1)  # 0.75
    ibar2 = 0.5 * ibar1 + 0.5 * sens[1]  # 2
    ubar2 = 0.75 * ubar1 + 0.25 * abs(sens[1] - ibar2)  # 0.8125
    assert scorer.scores()["l"].item() == pytest.approx(ibar2 * ubar2)  # A and B add 0
    assert dora_lab.get_scorer("smoothed_uncertainty").hyperparameters() == {"beta1": 0.85, "beta2": 0.85}


# -- batched scoring over equal-shape layers ---------------------------------------------------------------
@pytest.mark.parametrize("scorer_name", [n for n in dora_lab.list_scorers() if getattr(get_scorer(n), "batched", False)])
def test_batched_scorer_equals_scoring_layer_by_layer(scorer_name: str) -> None:
    """A batched scorer scores each group of equal-shape layers in one call (a LayerStack); its scores
    equal those of scoring every layer alone, EMA over steps and hard masks included."""
    from conftest import adapted_decoder, lm_batches

    model = adapted_decoder("llama", dtype=torch.float32)
    randomize_c(model, 2)
    layers = adapter_layers(model)
    names = list(layers)
    layers[names[0]].freeze_mask(torch.tensor([True, False, True, True]))  # its own group: hard mask
    together, alone = make_scorer(scorer_name), {n: make_scorer(scorer_name) for n in names}
    model.train()
    for x, y in lm_batches(3, seed=4):
        model(input_ids=x, labels=y).loss.backward()
        together.update(layers)
        for n in names:
            alone[n].update({n: layers[n]})
        model.zero_grad()
    scores = together.scores()
    assert list(scores) == names
    for n in names:
        torch.testing.assert_close(scores[n], alone[n].scores()[n], rtol=1e-6, atol=1e-12)
    assert sum(float(s.sum()) for s in scores.values()) > 0


def test_a_batched_function_is_called_once_per_group_of_equal_shapes() -> None:
    from conftest import adapted_decoder

    from dora_lab.core.scorers import FunctionScorer, LayerStack

    seen: list[tuple[int, ...]] = []

    def norm_of_c(component: RankOneLinear) -> torch.Tensor:
        seen.append(tuple(component.A.shape))
        return component.c.abs() + 1.0

    counting = type("Counting", (FunctionScorer,), {"fn": staticmethod(norm_of_c), "batched": True, "name": "c"})
    layers = adapter_layers(adapted_decoder("llama"))
    counting(beta=None).update(layers)
    # tiny Llama, 2 layers: q/o 32->32, k/v 32->16, gate/up 32->64 (4 each), down 64->32 (2)
    assert sorted(seen) == [(2, 4, 64), (4, 4, 32), (4, 4, 32), (4, 4, 32)]
    stack = LayerStack([layers["model.layers.0.mlp.down_proj"], layers["model.layers.1.mlp.down_proj"]], grads=False)
    assert stack.A.shape == (2, 4, 64) and stack.B.shape == (2, 32, 4) and stack.effective_c().shape == (2, 4)
