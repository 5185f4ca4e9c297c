"""save_adapter / load_adapter round trips, merging, and the refusals (wrong base, damaged files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_c, tiny_config
from transformers import BertForSequenceClassification

from dora_lab import adapter_layers, count_parameters, inject_adapters
from dora_lab.core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    AdapterMismatchError,
    BaseModelError,
    read_adapter_config,
    save_adapter,
)
from dora_lab.export.checkpoint import load_adapter
from dora_lab.export.merge import merge_adapters, merged_model, unmerge_adapters


def tiny_base(seed: int = 0, **overrides: int) -> BertForSequenceClassification:
    """conftest's tiny BERT in float32, with config fields changed for the wrong-base tests."""
    config = tiny_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def tiny_adapted(seed: int = 0) -> BertForSequenceClassification:
    """Uneven ranks: compacted to 2, compacted to 0, hard mask not compacted, soft mask, full."""
    model = tiny_base(seed)
    layers = inject_adapters(model, r0=4, trainable=("classifier", "pooler"))
    randomize_c(model, seed + 1)
    with torch.no_grad():
        model.classifier.weight.mul_(-3.0)
    names = list(layers)

    def keep(*idx: int) -> torch.Tensor:
        t = torch.zeros(4, dtype=torch.bool)
        t[list(idx)] = True
        return t

    layers[names[0]].freeze_mask(keep(1, 3))
    layers[names[0]].compact()
    layers[names[1]].freeze_mask(keep())
    layers[names[1]].compact()
    layers[names[2]].freeze_mask(keep(0, 2, 3))
    layers[names[3]].soft_prune(keep(0))
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=inputs()).logits


def test_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = tiny_adapted()
    ref = logits(model)
    assert (ref - logits(tiny_base())).abs().max() > 1e-2  # the adapter does something
    save_adapter(model, tmp_path, base_model="tiny", num_labels=2, extra={"lr": 1e-3, "path": tmp_path})

    loaded = load_adapter(tmp_path, tiny_base())
    assert torch.equal(logits(loaded), ref)
    old, new = adapter_layers(model), adapter_layers(loaded)
    assert list(old) == list(new)
    for name, layer in old.items():
        twin = new[name]
        assert (twin.rank, twin.active_rank, twin.hard_mask) == (layer.rank, layer.active_rank, layer.hard_mask)
        assert torch.equal(twin.index, layer.index) and torch.equal(twin.c, layer.c)
        assert twin.A.requires_grad and not twin.base.weight.requires_grad
    assert loaded.classifier.weight.requires_grad and loaded.bert.pooler.dense.weight.requires_grad
    assert not loaded.bert.embeddings.word_embeddings.weight.requires_grad
    assert count_parameters(loaded) == count_parameters(model)

    config = read_adapter_config(tmp_path)
    assert config["extra"] == {"lr": 1e-3, "path": str(tmp_path)}
    assert config["base_model"]["num_labels"] == 2 and config["base_model"]["model_type"] == "bert"
    first = config["layers"]["bert.encoder.layer.0.attention.self.query"]
    assert (first["rank"], first["active_rank"], first["hard_mask"]) == (2, 2, True)
    assert config["r0"] == 4 and config["alpha"] == 8.0 and len(config["targets"]) == 12


def test_load_without_model_uses_saved_base(tmp_path: Path) -> None:
    tiny_base().save_pretrained(tmp_path / "base")
    model = tiny_adapted()
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"), num_labels=2)
    loaded = load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=0, atol=1e-6)

    with pytest.raises(BaseModelError, match="local copy"):
        load_adapter(tmp_path / "adapter", base_model=str(tmp_path / "nowhere"))


def test_merge_helpers_and_merged_model(tmp_path: Path) -> None:
    model = tiny_adapted()
    ref = logits(model)
    assert merge_adapters(model) == 12
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=1e-5)
    assert unmerge_adapters(model) == 12
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=1e-5)

    plain = merged_model(model)
    assert not adapter_layers(plain) and adapter_layers(model)  # the original is untouched
    assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(logits(plain), ref, rtol=0, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again), ref, rtol=0, atol=1e-5)


def test_wrong_base_is_refused(tmp_path: Path) -> None:
    save_adapter(tiny_adapted(), tmp_path, base_model="tiny", num_labels=2)
    with pytest.raises(AdapterMismatchError, match="wrong base model.*weights of .* differ"):
        load_adapter(tmp_path, tiny_base(seed=1))
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_adapter(tmp_path, tiny_base(hidden_size=48, intermediate_size=64))
    with pytest.raises(AdapterMismatchError, match="no nn.Linear or Conv1D named"):
        load_adapter(tmp_path, tiny_base(num_hidden_layers=1))
    with pytest.raises(AdapterMismatchError, match="head parameter classifier.weight"):
        load_adapter(tmp_path, tiny_base(num_labels=3))
    with pytest.raises(AdapterMismatchError, match="already has adapter layers"):
        load_adapter(tmp_path, tiny_adapted())


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    save_adapter(tiny_adapted(), tmp_path, base_model="tiny", num_labels=2)
    weights = tmp_path / WEIGHTS_NAME
    blob = weights.read_bytes()

    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterFileError, match="damaged or truncated"):
        load_adapter(tmp_path, tiny_base())

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["weights_sha256"]  # without the checksum the safetensors reader must still catch it
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_adapter(tmp_path, tiny_base())

    weights.unlink()
    with pytest.raises(AdapterFileError, match="weights .* are missing"):
        load_adapter(tmp_path, tiny_base())
    (tmp_path / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_adapter(tmp_path, tiny_base())
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        load_adapter(tmp_path, tiny_base())


def test_inconsistent_files_are_refused(tmp_path: Path) -> None:
    save_adapter(tiny_adapted(), tmp_path / "a", base_model="tiny", num_labels=2)
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    config["layers"]["bert.encoder.layer.9.output.dense"] = config["layers"]["bert.encoder.layer.0.output.dense"]
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"missing tensors \['bert.encoder.layer.9.output.dense.A'"):
        load_adapter(tmp_path / "a", tiny_base())

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(AdapterFileError, match="PEFT adapter"):
        load_adapter(tmp_path / "p", tiny_base())
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(tiny_base(), tmp_path / "b", base_model="tiny", num_labels=2)


def test_the_version_written_is_the_projects(tmp_path: Path) -> None:
    """The version in a saved adapter comes from the core's one home, which is pyproject's version and
    the facade's ``dora_lab.__version__``."""
    import tomllib

    import dora_lab
    from dora_lab.core.version import __version__

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"] == dora_lab.__version__
    save_adapter(tiny_adapted(), tmp_path, base_model="tiny", num_labels=2)
    assert read_adapter_config(tmp_path)["dora_lab_version"] == project["version"]


def test_core_reads_and_applies_without_the_export_layer(tmp_path: Path) -> None:
    """The core's read_adapter + apply_adapter is what load_adapter does onto a given base; a damaged
    weights file is refused before the base model it names is loaded (no base exists at that name)."""
    from dora_lab.core.checkpoint import apply_adapter, read_adapter

    model = tiny_adapted()
    save_adapter(model, tmp_path / "a", base_model=str(tmp_path / "no-such-base"), num_labels=2)
    config, tensors = read_adapter(tmp_path / "a")
    torch.testing.assert_close(logits(apply_adapter(tiny_base(), config, tensors)), logits(model), rtol=0, atol=0)

    weights = tmp_path / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AdapterFileError, match="damaged or truncated"):
        load_adapter(tmp_path / "a")  # not BaseModelError: the files are checked first
