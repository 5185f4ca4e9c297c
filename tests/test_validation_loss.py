"""alora's validation loss: stacked copies with one component masked out each (core/adapter/dropped.py)
against masking the components one at a time and the model's own loss (run/validation.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import DECODERS, VOCAB, adapted_bert, adapted_decoder, randomize_c

from dora_lab import PruningController, adapter_layers, make_method, make_scorer
from dora_lab.core.adapter.dropped import dropped_per_copy
from dora_lab.run.validation import ValidationLoss

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def hard_masked(model: torch.nn.Module) -> dict[str, Any]:
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.hard_mask = True
    randomize_c(model)
    return layers


def masked_one_at_a_time(model: torch.nn.Module, loss: Any, drops: list[tuple[Any, int]]) -> list[float]:
    out = []
    for layer, i in drops:
        layer.mask[i] = 0.0
        out.append(float(loss()))
        layer.mask[i] = 1.0
    return out


def cls_batches(seed: int, sizes: tuple[int, ...], regression: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, width in zip(sizes, (9, 6, 4), strict=False):
        mask = torch.ones(n, width, dtype=torch.long)
        mask[0, width - 2:] = 0  # some padding
        labels = torch.randn(n, generator=g, dtype=torch.float64) if regression else torch.randint(0, 2, (n,), generator=g)
        out.append({"input_ids": torch.randint(0, VOCAB, (n, width), generator=g), "attention_mask": mask,
                    "labels": labels})
    return out


def test_each_stacked_copy_is_the_forward_without_its_component() -> None:
    model = adapted_bert(r0=3)
    layers = list(hard_masked(model).values())
    batch = cls_batches(0, (3,))[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    drops = [(layers[0], 1), (layers[5], 0), (layers[0], 2), (layers[-1], 2)]
    with torch.no_grad(), dropped_per_copy(drops, 3):
        stacked = model(**{k: v.repeat(len(drops), 1) for k, v in inputs.items()}).logits
    for k, (layer, i) in enumerate(drops):
        layer.mask[i] = 0.0
        with torch.no_grad():
            want = model(**inputs).logits
        layer.mask[i] = 1.0
        torch.testing.assert_close(stacked[3 * k : 3 * k + 3], want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(stacked[:3], model(**inputs).logits)  # the drop changed something
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"), dropped_per_copy(drops, 3):
        pass


def test_each_stacked_alone_copy_is_the_forward_with_only_its_component() -> None:
    """ALoRA's "only i": copy k keeps drops[k] and masks every other component of every layer."""
    model = adapted_bert(r0=3)
    layers = list(hard_masked(model).values())
    batch = cls_batches(4, (3,))[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    drops = [(layers[0], 1), (layers[5], 0), (layers[-1], 2)]
    with torch.no_grad(), dropped_per_copy(drops, 3, alone_in=layers):
        stacked = model(**{k: v.repeat(len(drops), 1) for k, v in inputs.items()}).logits
    saved = [layer.mask.clone() for layer in layers]
    for k, (lone, i) in enumerate(drops):
        for layer in layers:
            layer.mask.zero_()
        lone.mask[i] = 1.0
        with torch.no_grad():
            want = model(**inputs).logits
        for layer, mask in zip(layers, saved, strict=True):
            layer.mask.copy_(mask)
        torch.testing.assert_close(stacked[3 * k : 3 * k + 3], want, rtol=1e-10, atol=1e-12)
    loss = ValidationLoss(model, cls_batches(5, (5, 3)), NO_AUTOCAST, max_rows=10)
    alone = loss.alone(drops, layers)
    for k, (lone, i) in enumerate(drops):
        for layer in layers:
            layer.mask.zero_()
        lone.mask[i] = 1.0
        assert alone[k] == pytest.approx(loss(), rel=1e-9)
        for layer, mask in zip(layers, saved, strict=True):
            layer.mask.copy_(mask)


@pytest.mark.parametrize("regression", [False, True])
def test_the_stacked_losses_are_the_masked_losses_of_a_classifier(regression: bool) -> None:
    model = adapted_bert(r0=3)
    if regression:
        model.config.num_labels, model.num_labels = 1, 1
        model.classifier = torch.nn.Linear(32, 1).double()
    layers = list(hard_masked(model).values())
    loss = ValidationLoss(model, cls_batches(1, (5, 3), regression), NO_AUTOCAST, max_rows=10)  # 2 copies a forward
    drops = [(layer, i) for layer in layers for i in range(3)]
    torch.testing.assert_close(torch.tensor(loss.without(drops)),
                               torch.tensor(masked_one_at_a_time(model, loss, drops)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", DECODERS)
def test_the_stacked_losses_are_the_masked_losses_of_a_causal_lm(kind: str) -> None:
    model = adapted_decoder(kind, r0=3)
    layers = list(hard_masked(model).values())
    g = torch.Generator().manual_seed(2)
    batches = []
    for n, width in ((4, 7), (2, 5)):
        ids = torch.randint(0, VOCAB, (n, width), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100  # the prompt
        labels[0, -1] = -100  # padding
        batches.append({"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(width) < 2),
                        "labels": labels})
    loss = ValidationLoss(model, batches, NO_AUTOCAST, max_rows=8)
    drops = [(layer, i) for layer in layers[:4] for i in range(3)]
    # transformers computes a causal LM's loss in float32 (ForCausalLMLoss upcasts), so ~1e-7 apart
    torch.testing.assert_close(torch.tensor(loss.without(drops)),
                               torch.tensor(masked_one_at_a_time(model, loss, drops)), rtol=1e-6, atol=1e-7)


def test_alora_scores_the_same_with_the_stacked_loss_and_a_plain_one() -> None:
    model = adapted_bert(r0=3)
    randomize_c(model)
    ctl = PruningController(model, make_scorer("magnitude"), "linear", 10, target_rank=2, warmup=1, final=2,
                            interval=1, method=make_method("alora"))
    stacked = ValidationLoss(model, cls_batches(3, (4, 2)), NO_AUTOCAST, max_rows=12)
    ctl.set_validation(stacked)
    fast = ctl.method.scores()  # type: ignore[attr-defined]
    ctl.set_validation(lambda: stacked())  # no .without: one component at a time
    slow = ctl.method.scores()  # type: ignore[attr-defined]
    assert fast.keys() == slow.keys()
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-9, atol=1e-12, equal_nan=True)
    assert sum(int(torch.isfinite(s).sum()) for s in fast.values()) == 24  # the 2 x 12 active components
