"""Packing (train.packing): a batch's rows joined into few sequences, attention kept within each
row by restarting position ids; the loss equals the unpacked loss on a tiny Llama and GPT-2, a model
whose mask ignores the positions (OPT) is refused, and a packed run trains like an unpacked one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dora_lab.run.batching import make_loader
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.packing import check_packing, pack_rows
from dora_lab.run.tasks import get_task
from dora_lab.run.train import train_run
from tests.tiny import INSTRUCT, REPO, LossRecorder, make_tiny_decoder_dir

SPEC = get_task("instruct")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pack")
    return {kind: make_tiny_decoder_dir(root / kind, kind, positions=256) for kind in ("llama", "gpt2", "opt")}


def load(folder: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**{k: v for k, v in batch.items() if k != "index"}).loss)


def test_rows_are_packed_first_fit_longest_first() -> None:
    # by hand: 8 opens bin 0 (room 2), 5 bin 1 (room 5), 4 joins bin 1 (room 1), 3 opens bin 2, 2 fills bin 0
    assert pack_rows([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert pack_rows([5, 3, 8, 2, 4], 100) == [[0, 1, 2, 3, 4]]
    assert pack_rows([10, 10], 10) == [[0], [1]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_batches_give_the_unpacked_loss(kind: str, folders: dict[str, Path]) -> None:
    model, tokenizer = load(folders[kind])
    rows = load_splits(SPEC, INSTRUCT, max_train_samples=32)["train"]
    kw = {"batch_size": 8, "max_length": 128, "shuffle": True, "group_by_length": False, "seed": 3}
    plain, packed = make_loader(rows, SPEC, tokenizer, **kw), make_loader(rows, SPEC, tokenizer, packing=True, **kw)
    pairs = list(zip(plain, packed, strict=True))
    assert len(pairs) == 4
    assert sum(b["input_ids"].numel() for _, b in pairs) < sum(a["input_ids"].numel() for a, _ in pairs)
    for a, b in pairs:
        assert torch.equal(a["index"], b["index"])  # the same rows in each batch
        assert b["input_ids"].shape[0] < a["input_ids"].shape[0] and "attention_mask" not in b
        assert b["input_ids"].numel() <= a["input_ids"].numel()  # no more padding
        assert int((b["labels"] != -100).sum()) == int((a["labels"] != -100).sum())
        assert loss(model, b) == pytest.approx(loss(model, a), rel=1e-6)  # HF's loss is taken in float32
        # control: the same packed tokens with positions running on across rows attend across them
        leaky = {**b, "position_ids": torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])}
        assert abs(loss(model, leaky) - loss(model, a)) > 1e-4


def test_a_model_whose_mask_ignores_the_positions_is_refused(folders: dict[str, Path]) -> None:
    rows = load_splits(SPEC, INSTRUCT, max_train_samples=8)["train"]
    for kind, refused in (("opt", True), ("llama", False)):
        model, tokenizer = load(folders[kind])
        loader = make_loader(rows, SPEC, tokenizer, batch_size=4, max_length=128, shuffle=False, packing=True)
        if refused:
            with pytest.raises(ConfigError, match=r"train.packing: this model \(OPTForCausalLM\) lets packed rows"):
                check_packing(model, loader, CPU)
        else:
            check_packing(model, loader, CPU)


def test_packing_a_classifier_task_is_refused(folders: dict[str, Path]) -> None:
    _, tokenizer = load(folders["llama"])
    rows = [{"sentence": "a b", "label": 1, "idx": 0}]
    with pytest.raises(ConfigError, match="train.packing joins a causal task's training rows"):
        make_loader(rows, get_task("cola"), tokenizer, batch_size=4, shuffle=True, packing=True)


def test_a_packed_run_trains_like_an_unpacked_one(folders: dict[str, Path], tmp_path: Path) -> None:
    losses = []
    for packing in (False, True):
        cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", [
            f"model.name={folders['llama']}", f"output_dir={tmp_path}", "task.max_length=128",
            f"task.data_dir={INSTRUCT}", "task.max_train_samples=32", "task.max_eval_samples=8",
            "train.max_steps=6", "train.batch_size=8", "train.eval_every=6", "schedule.interval=1",
            "train.group_by_length=false", "eval.at_start=false", f"train.packing={str(packing).lower()}"])
        recorder = LossRecorder()
        train_run(cfg, tmp_path / f"run{packing}", [recorder], progress=False)
        losses.append(recorder.values)
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
