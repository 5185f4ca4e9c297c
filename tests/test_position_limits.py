"""A decoder's position limit comes from its config (``max_position_embeddings``, GPT-2's
``n_positions``) or its learned table of any name (GPT-2's ``wpe``, OPT's ``embed_positions`` with its
2 extra rows), and a longer ``task.max_length`` is refused before any work (exit 2), the limit named.
Each limit is checked to be the real one: the model runs at it and fails (or, rotary, is untrained) past it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.models import check_model, load_model_and_tokenizer
from dora_lab.run.positions import sequence_limit
from dora_lab.run.train import main as train_main
from tests.tiny import REPO, make_tiny_decoder_dir

# kind -> the bound each names (the tokenizer allows 256, so the model's 64 is the limit)
WHY = {"gpt2": "config.n_positions 64", "opt": "config.max_position_embeddings 64",
       "llama": "config.max_position_embeddings 64"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {kind: make_tiny_decoder_dir(root / kind, kind, positions=64) for kind in WHY}


@pytest.mark.parametrize("kind", sorted(WHY))
def test_the_limit_is_the_configs_and_names_it(kind: str, folders: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(folders[kind])
    tokenizer = AutoTokenizer.from_pretrained(folders[kind])
    assert sequence_limit(model, tokenizer) == (64, [WHY[kind], "tokenizer.model_max_length 256"])
    with pytest.raises(ConfigError) as err:
        load_model_and_tokenizer(str(folders[kind]), 0, max_length=128, causal=True)
    assert "task.max_length=128 is longer than model" in str(err.value) and "at most 64 tokens" in str(err.value)
    assert WHY[kind] in str(err.value) and "--set task.max_length=64" in str(err.value)
    with pytest.raises(ConfigError, match="at most 64 tokens"):  # the quick check (meta weights) agrees
        check_model(str(folders[kind]), 65)
    check_model(str(folders[kind]), 64)


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_a_learned_tables_limit_is_the_real_one(kind: str, folders: dict[str, Path]) -> None:
    """64 tokens run; 65 index past the table (OPT's has 66 rows, 2 of them before position 0)."""
    model = AutoModelForCausalLM.from_pretrained(folders[kind]).eval()
    ids = torch.full((1, 65), 5)
    with torch.no_grad():
        model(input_ids=ids[:, :64])
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=ids)


def test_a_table_of_another_name_is_found_without_a_config_key(folders: dict[str, Path]) -> None:
    """A table alone bounds a model whose config saves no limit: GPT-2's ``wpe`` with its config key gone."""
    model = AutoModelForCausalLM.from_pretrained(folders["gpt2"])

    class Bare:
        def to_dict(self) -> dict[str, int]:
            return {}

    model.config = Bare()  # type: ignore[assignment]

    class Unlimited:
        model_max_length = int(1e30)

    assert sequence_limit(model, Unlimited()) == (64, ["position table transformer.wpe of 64 rows"])


def test_train_refuses_a_too_long_max_length_with_exit_2(folders: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The run the issue reports (GPT-2, n_positions 64, max_length 128) fails mid-run with an
    IndexError (exit 1) on the old check; now it is refused before any work."""
    sets = [f"model.name={folders['gpt2']}", f"output_dir={tmp_path / 'out'}", "task.max_length=128",
            f"task.data_dir={REPO / 'data' / 'instruct'}", "task.max_train_samples=8", "task.max_eval_samples=4",
            "train.max_steps=2", "train.batch_size=4"]
    code = train_main([str(REPO / "configs" / "smollm2_instruct.yaml"), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "task.max_length=128" in err and "at most 64 tokens" in err and "config.n_positions 64" in err
    assert not list((tmp_path / "out").rglob("metrics.json"))
