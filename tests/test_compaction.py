"""Compaction (dropping frozen-out components and their optimizer state) and the controller's
state_dict/load_state_dict round trip, mid-run and after compaction."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from conftest import adamw, adapted_bert, batches, logits, randomize_c, train

from dora_lab import PruningController, adapter_layers, make_scorer

T, WARMUP, FINAL, INTERVAL = 12, 2, 3, 2  # prune at 2, 4, 6, 8; freeze (and compact) at 9


def test_compaction_keeps_logits_and_slices_parameters_and_optimizer_state() -> None:
    model = adapted_bert(0, dtype=torch.float32)
    optimizer = adamw(model)
    train(model, optimizer, None, batches(3))  # real AdamW state to slice
    randomize_c(model)
    layers = adapter_layers(model)
    g = torch.Generator().manual_seed(0)
    keeps = {n: torch.rand(4, generator=g) < 0.5 for n in layers}
    keeps["bert.encoder.layer.0.attention.self.key"] = torch.zeros(4, dtype=torch.bool)  # rank 0
    keeps["bert.encoder.layer.1.output.dense"] = torch.ones(4, dtype=torch.bool)  # nothing dropped
    for n, layer in layers.items():
        layer.freeze_mask(keeps[n])
    data = batches(2, seed=5)
    before = logits(model, data)
    old = {n: (layer.A.detach().clone(), layer.B.detach().clone(), layer.c.detach().clone(),
               optimizer.state[layer.A]["exp_avg"].clone(), optimizer.state[layer.B]["exp_avg_sq"].clone())
           for n, layer in layers.items()}
    for layer in layers.values():
        layer.compact(optimizer)
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=1e-6)
    for n, layer in layers.items():
        kept = keeps[n].nonzero().flatten()
        a, b, c, m_a, v_b = old[n]
        assert layer.index.tolist() == kept.tolist() and layer.rank == len(kept)
        assert torch.equal(layer.A, a[kept]) and torch.equal(layer.B, b[:, kept]) and torch.equal(layer.c, c[kept])
        assert torch.equal(optimizer.state[layer.A]["exp_avg"], m_a[kept])
        assert torch.equal(optimizer.state[layer.B]["exp_avg_sq"], v_b[:, kept])
        assert layer.mask.tolist() == [1.0] * len(kept) and layer.active_rank == len(kept)
        assert layer.scale == 8.0 / 4  # alpha / r0: the scale keeps the start rank
    assert len(optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


def checkpoint(state: Any) -> Any:
    """Through ``torch.save``/``torch.load`` (weights only), as a real checkpoint goes: no aliasing
    of live tensors, and the controller's state must be plain data."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run(compact: bool, steps: int, seed: int = 0) -> tuple[torch.nn.Module, PruningController, torch.optim.Optimizer]:
    model = adapted_bert(seed)
    randomize_c(model)
    controller = PruningController(model, make_scorer("smoothed_uncertainty"), "dora", T, target_rank=1.5,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL, compact=compact)
    optimizer = adamw(model)
    train(model, optimizer, controller, batches(T)[:steps])
    return model, controller, optimizer


def test_adamw_steps_after_compaction_equal_the_masked_uncompacted_steps() -> None:
    frozen_at = T - FINAL
    small, small_ctl, small_opt = run(compact=True, steps=frozen_at + 1)
    full, full_ctl, full_opt = run(compact=False, steps=frozen_at + 1)
    assert small_ctl.frozen and full_ctl.frozen
    data = batches(T)[frozen_at + 1 :]
    probe = batches(2, seed=7)
    torch.testing.assert_close(logits(small, probe), logits(full, probe), rtol=0, atol=1e-10)
    for steps in (data[:1], data[1:]):  # one more AdamW step, then the rest of the run
        train(small, small_opt, small_ctl, steps)
        train(full, full_opt, full_ctl, steps)
        torch.testing.assert_close(logits(small, probe), logits(full, probe), rtol=0, atol=1e-10)
        big_layers = adapter_layers(full)
        for n, layer in adapter_layers(small).items():
            ref = big_layers[n]
            kept = ref.mask.nonzero().flatten()
            assert layer.index.tolist() == kept.tolist()
            torch.testing.assert_close(layer.A, ref.A[kept], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.B, ref.B[:, kept], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.c, ref.c[kept], rtol=1e-9, atol=1e-12)
    assert sum(layer.rank for layer in adapter_layers(small).values()) == 18
    assert sum(layer.rank for layer in adapter_layers(full).values()) == 48


def test_controller_state_round_trip_mid_run() -> None:
    """Stop after a soft prune, restore into a fresh model (other initial weights), and finish:
    the result equals an uninterrupted run."""
    whole, whole_ctl, _ = run(compact=True, steps=T)

    stop = 7  # steps 0..6 done: soft prunes at 2, 4, 6 applied, scorer EMAs filled
    model, controller, optimizer = run(compact=True, steps=stop)
    saved = checkpoint((controller.state_dict(), model.state_dict(), optimizer.state_dict()))
    assert saved[0]["t"] == stop and not saved[0]["frozen"]

    fresh = adapted_bert(seed=3)
    fresh_ctl = PruningController(fresh, make_scorer("smoothed_uncertainty"), "dora", T, target_rank=1.5,
                                  warmup=WARMUP, final=FINAL, interval=INTERVAL)
    fresh_ctl.load_state_dict(saved[0])
    fresh.load_state_dict(saved[1])
    fresh_opt = adamw(fresh)
    fresh_opt.load_state_dict(saved[2])
    assert fresh_ctl.t == stop and fresh_ctl.allocation() == controller.allocation() != {}
    assert sum(fresh_ctl.allocation().values()) == 48 - int(30 * (4 / 7) ** 3)  # the budget at t = 6
    train(fresh, fresh_opt, fresh_ctl, batches(T)[stop:])

    assert fresh_ctl.allocation() == whole_ctl.allocation()
    probe = batches(2, seed=7)
    torch.testing.assert_close(logits(fresh, probe), logits(whole, probe), rtol=0, atol=1e-10)


def test_compacted_model_restores_into_a_fresh_model() -> None:
    model = adapted_bert(0)
    controller = PruningController(model, make_scorer("magnitude"), "linear", T, target_rank=0.5,
                                   warmup=WARMUP, final=FINAL, interval=INTERVAL)
    optimizer = adamw(model)
    train(model, optimizer, controller, batches(T - 1))
    ranks = {n: layer.rank for n, layer in adapter_layers(model).items()}
    assert sum(ranks.values()) == 6 and 0 in ranks.values()  # some layer lost every component
    state, weights, opt_state = checkpoint((controller.state_dict(), model.state_dict(), optimizer.state_dict()))

    fresh = adapted_bert(seed=4)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the weights need the shapes first
        fresh.load_state_dict(weights)
    fresh_ctl = PruningController(fresh, make_scorer("magnitude"), "linear", T, target_rank=0.5,
                                  warmup=WARMUP, final=FINAL, interval=INTERVAL)
    fresh_ctl.load_state_dict(state)
    fresh.load_state_dict(weights)
    assert {n: layer.rank for n, layer in adapter_layers(fresh).items()} == ranks
    assert fresh_ctl.frozen and fresh_ctl.t == T - 1
    for n, layer in adapter_layers(fresh).items():
        ref = adapter_layers(model)[n]
        assert layer.hard_mask and torch.equal(layer.index, ref.index) and torch.equal(layer.A, ref.A)
    for s_new, s_old in zip(fresh_ctl.scorer.scores().values(), controller.scorer.scores().values(), strict=True):
        assert torch.equal(s_new, s_old)
    probe = batches(2, seed=7)
    torch.testing.assert_close(logits(fresh, probe), logits(model, probe), rtol=0, atol=0)

    fresh_opt = adamw(fresh)
    fresh_opt.load_state_dict(opt_state)
    last = batches(T)[T - 1 :]
    train(model, optimizer, controller, last)
    train(fresh, fresh_opt, fresh_ctl, last)
    torch.testing.assert_close(logits(fresh, probe), logits(model, probe), rtol=0, atol=1e-12)
