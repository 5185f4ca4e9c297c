"""methods/fisher.py: one-shot ranks from each component's diagonal Fisher information at the start,
against an independent computation from the base weights' gradients and a hand-worked case."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import adamw, adapted_bert, adapted_decoder, batches, lm_batches, logits, train

from dora_lab import PruningController, RankOneLinear, adapter_layers, make_method, make_scorer
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError

REPO = Path(__file__).resolve().parents[1]


def reference_fisher(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """F_i = mean over batches of ((alpha/r0) B[:, i]^T G A[i, :]^T)^2, G = dL/dW of each frozen base weight
    (autograd on the base weights themselves; at c = 0 the adapted layer computes with W alone)."""
    layers = adapter_layers(model)
    weights = [layer.base.weight for layer in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    try:
        out = {n: torch.zeros(layer.rank, dtype=torch.float64) for n, layer in layers.items()}
        for x, y in data:
            grads = torch.autograd.grad(model(input_ids=x, labels=y).loss, weights)
            for (n, layer), g in zip(layers.items(), grads, strict=True):
                g = g.t() if layer.fan_in_fan_out else g  # Conv1D stores W as d_in x d_out
                a, b = layer.A.detach(), layer.B.detach()
                d = torch.stack([layer.scale * b[:, i] @ g @ a[i] for i in range(layer.rank)])
                out[n] += d**2 / len(data)
        return out
    finally:
        for w in weights:
            w.requires_grad_(False)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_fisher_is_the_mean_squared_gate_gradient_from_the_base_weights_gradient(kind: str) -> None:
    model = adapted_bert(0) if kind == "bert" else adapted_decoder("gpt2")  # float64, eval mode, c = 0
    data = batches(3) if kind == "bert" else lm_batches(3)
    expected = reference_fisher(model, data[:2])
    ctl = PruningController(model, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                            method=make_method("fisher", batches=2))
    ctl.before_training(lambda b: model(input_ids=b[0], labels=b[1]), data)  # the third is not read
    fisher = ctl.method.fisher  # type: ignore[attr-defined]
    assert set(fisher) == set(expected)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-6, atol=1e-12)
    assert all(float(f.max()) > 0 for f in fisher.values())


def hand_layers() -> dict[str, RankOneLinear]:
    """Two 3 -> 3 layers with A = B = I: component i's gate gradient under L = sum(p(x_p)) + sum(q(x_q))
    is (alpha/r0) x[i], so F_i = (8/3)^2 x[i]^2 from one batch."""
    torch.manual_seed(0)
    out = {}
    for n in "pq":
        layer = RankOneLinear(torch.nn.Linear(3, 3).double(), r0=3, dropout=0.0)
        with torch.no_grad():
            layer.A.copy_(torch.eye(3))
            layer.B.copy_(torch.eye(3))
        out[n] = layer
    return out


XP, XQ = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), torch.tensor([2.5, 0.5, 0.0], dtype=torch.float64)


@pytest.mark.parametrize(("budget", "kept_p", "kept_q"), [
    # F_p = s^2 (1, 9, 4), F_q = s^2 (6.25, 0.25, 0): the global top 3 are p1, q0, p2 (p keeps no prefix)
    ({"target_rank": 1.5}, [False, True, True], [True, False, False]),
    # 7 parameters a component (3 + 3 + 1): 20 fits p1 and q0 (14), not p2 as well (21)
    ({"target_params": 20}, [False, True, False], [True, False, False]),
])
def test_fisher_keeps_the_global_top_within_the_target(budget: dict[str, float], kept_p: list[bool],
                                                         kept_q: list[bool]) -> None:
    lay = hand_layers()
    ctl = PruningController(lay, make_scorer("magnitude"), "dora", 10, warmup=1, final=2,
                            method=make_method("fisher", batches=1), **budget)  # type: ignore[arg-type]
    ctl.before_training(lambda b: lay["p"](b[0]).sum() + lay["q"](b[1]).sum(), [(XP, XQ)])
    s2 = (8 / 3) ** 2
    torch.testing.assert_close(ctl.method.fisher["p"], s2 * XP**2)  # type: ignore[attr-defined]
    torch.testing.assert_close(ctl.method.fisher["q"], s2 * XQ**2)  # type: ignore[attr-defined]
    assert lay["p"].mask.bool().tolist() == kept_p and lay["q"].mask.bool().tolist() == kept_q
    opt = torch.optim.AdamW([p for m in lay.values() for p in m.parameters() if p.requires_grad])
    info = ctl.step(opt)  # frozen and compacted at step 0
    assert info.pruned and info.frozen and info.budget == ctl.target
    assert lay["p"].index.tolist() == [i for i, k in enumerate(kept_p) if k]
    assert lay["q"].index.tolist() == [i for i, k in enumerate(kept_q) if k]
    assert not ctl.step(opt).pruned  # the ranks are fixed from then on
    saved = make_method("fisher")
    saved.load_state_dict(ctl.method.state_dict())  # checkpoints carry the scores
    assert all(torch.equal(saved.fisher[n], ctl.method.fisher[n]) for n in "pq")  # type: ignore[attr-defined]


def test_before_training_leaves_no_gradient_and_the_output_unchanged() -> None:
    model = adapted_bert(0, trainable=["classifier"])
    data = batches(4)
    before = logits(model, data)
    ctl = PruningController(model, make_scorer("magnitude"), "dora", 10, target_rank=1.5, warmup=1, final=2,
                            method=make_method("fisher"))
    ctl.before_training(lambda b: model(input_ids=b[0], labels=b[1]), data)
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("classifier"))
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=0)
    assert sum(lay.active_rank for lay in ctl.layers.values()) == 18 and not model.training
    infos = train(model, adamw(model), ctl, data)  # then it trains with the 18 kept components
    assert infos[0].frozen and sum(ctl.allocation().values()) == 18


def test_bad_batches_and_a_run_batch_without_a_loss_are_refused() -> None:
    with pytest.raises(ValueError, match=r"batches must be >= 1 .* got 0; set method.params.batches to 1 or more"):
        make_method("fisher", batches=0)
    with pytest.raises(ConfigError, match=r"method.params: batches must be >= 1"):
        load_config(REPO / "configs" / "cola.yaml", ["method.name=fisher", "method.params.batches=0"])
    model = adapted_bert(0)
    ctl = PruningController(model, make_scorer("magnitude"), "dora", 10, target_rank=2, warmup=1, final=2,
                            method=make_method("fisher"))
    with pytest.raises(RuntimeError, match=r"run_batch\(b\) must run the model with the batch's labels"):
        ctl.before_training(lambda b: model(input_ids=b[0]), batches(2))
    with pytest.raises(RuntimeError, match="gave no calibration batch"):
        ctl.before_training(lambda b: model(input_ids=b[0], labels=b[1]), [])
    with pytest.raises(RuntimeError, match="call controller.before_training"):
        ctl.step(adamw(model))
