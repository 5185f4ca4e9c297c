"""transformers' load report, kept to what matters (dora_lab.run.load_report): a load whose only
missing keys are the new task head (and whose only unexpected keys are a dropped pretraining head)
prints nothing; a checkpoint that lacks an encoder tensor, or has one the model has no place for,
gets one ``warning:`` line naming it, once per process; the "Loading weights" bar shows on a
terminal only, and never inside a study's trial.  Real loads of a tiny BERT from local folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

from dora_lab.run.load_report import unexpected_keys
from dora_lab.run.models import load_model_and_tokenizer
from tests.tiny import REPO, make_tiny_model_dir

TRAINABLE = ["classifier", "pooler"]  # model.trainable's default
DROPPED = "bert.encoder.layer.1.attention.self.query.weight"


def _pretraining_dir(path: Path) -> Path:
    """The tiny BERT saved as a pretraining checkpoint: cls.* heads, no classifier (as a Hub BERT)."""
    make_tiny_model_dir(path)
    BertForPreTraining(BertConfig.from_pretrained(path)).save_pretrained(path)
    return path


def _edit_weights(path: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None) -> None:
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    if drop is not None:
        del weights[drop]
    weights.update(add or {})
    save_file(weights, weights_file, metadata={"format": "pt"})


def test_only_the_new_head_missing_prints_no_report_and_no_bar(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _pretraining_dir(tmp_path / "pretraining")
    capfd.readouterr()
    model, _ = load_model_and_tokenizer(str(folder), 2, trainable=TRAINABLE)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "warning:" not in err, err
    assert "Loading weights" not in err, err  # stderr is not a terminal here
    assert isinstance(model, BertForSequenceClassification) and model.classifier.out_features == 2


def test_a_missing_encoder_tensor_is_one_warning_naming_it_once_a_process(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = make_tiny_model_dir(tmp_path / "broken")
    _edit_weights(folder, drop=DROPPED)
    capfd.readouterr()
    load_model_and_tokenizer(str(folder), 2, trainable=TRAINABLE)
    load_model_and_tokenizer(str(folder), 2, trainable=TRAINABLE)  # a study's next trial: said already
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert f"missing {DROPPED}" in warnings[0] and str(folder) in warnings[0]
    assert "classifier" not in warnings[0]
    assert "LOAD REPORT" not in err, err


def test_an_unexpected_encoder_key_warns_but_a_pretraining_head_does_not(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    folder = _pretraining_dir(tmp_path / "extra")
    extra = "bert.encoder.layer.5.output.dense.weight"  # a 2-layer model has no layer 5
    _edit_weights(folder, add={extra: torch.zeros(32, 64)})
    capfd.readouterr()
    load_model_and_tokenizer(str(folder), 2, trainable=TRAINABLE)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"unexpected {extra}" in warnings[0], warnings
    assert "cls." not in warnings[0] and "missing" not in warnings[0]


def test_a_head_left_out_of_model_trainable_is_still_expected_but_a_causal_lm_head_is_not(tmp_path: Path) -> None:
    """The rule itself, on a real load's info: outside the base model a classifier's head is new;
    ``model.trainable`` covers a missing pooler; a causal LM's missing head is a broken checkpoint."""
    folder = _pretraining_dir(tmp_path / "rule")
    _edit_weights(folder, drop="bert.pooler.dense.weight")
    model, info = BertForSequenceClassification.from_pretrained(folder, num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"}
    assert unexpected_keys(model, info, TRAINABLE, causal=False) == {}
    assert unexpected_keys(model, info, ["classifier"], causal=False) == {"missing": ["bert.pooler.dense.weight"]}
    assert unexpected_keys(model, info, [], causal=True) == {
        "missing": ["bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]}


def test_a_load_that_raises_still_prints_transformers_report(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A 3-label checkpoint for a 2-label task: transformers refuses the shapes after its report;
    held back while loading, the report is printed before the error goes up."""
    folder = make_tiny_model_dir(tmp_path / "three")
    _edit_weights(folder, add={"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(3)})
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_model_and_tokenizer(str(folder), 2, trainable=TRAINABLE)
    err = capfd.readouterr().err
    assert "LOAD REPORT" in err and "classifier.weight" in err and "MISMATCH" in err, err


SCRIPT = """
import sys
from dora_lab.run.load_report import hf_bars
from dora_lab.run.models import load_model_and_tokenizer
print("[single run]", file=sys.stderr, flush=True)
load_model_and_tokenizer(sys.argv[1], 2, trainable=["classifier", "pooler"])
print("[study trial]", file=sys.stderr, flush=True)
with hf_bars(False):
    load_model_and_tokenizer(sys.argv[1], 2, trainable=["classifier", "pooler"])
print("[end]", file=sys.stderr, flush=True)
"""


def test_the_loading_bar_shows_on_a_terminal_but_not_in_a_study_trial(tmp_path: Path) -> None:
    """A real pseudo-terminal as the child's stderr (stdout a pipe), 100 columns wide (tqdm draws
    nothing on a terminal 0 columns wide, a new pty's size)."""
    import fcntl
    import pty
    import struct
    import termios

    folder = _pretraining_dir(tmp_path / "tty")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", SCRIPT, str(folder)], stderr=follower, stdout=subprocess.PIPE,
                          env=env, cwd=REPO) as child:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert child.wait(timeout=120) == 0
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    single, trial = text.split("[single run]", 1)[1].split("[study trial]", 1)
    assert "Loading weights" in single, text
    assert "Loading weights" not in trial.split("[end]")[0], text
    assert "LOAD REPORT" not in text, text


# -- every other load: export's base model (export, generate, lm_eval) ---------------------------------
def _classifier_adapter(base: Path, out: Path) -> Path:
    """An adapter saved from a classifier loaded off ``base`` (a pretraining checkpoint: its own load
    has a LOAD REPORT, the new head missing and cls.* unexpected)."""
    from dora_lab import inject_adapters
    from dora_lab.core.checkpoint import save_adapter

    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    inject_adapters(model, r0=2)
    return save_adapter(model, out, base_model=str(base), num_labels=2)


def test_export_loads_the_adapters_base_without_the_report(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``python -m dora_lab.export ... --to merged``: the base load's report (the new head, the dropped
    cls.* head) is expected, so nothing is said; old code printed transformers' LOAD REPORT table."""
    from dora_lab.export.cli import main as export_main

    adapter = _classifier_adapter(_pretraining_dir(tmp_path / "base"), tmp_path / "adapter")
    capfd.readouterr()
    assert export_main([str(adapter), "--to", "merged", str(tmp_path / "merged")]) == 0
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "warning:" not in err and "Loading weights" not in err, err


def test_an_unexpected_key_in_an_adapters_base_is_one_warning_line(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    from dora_lab.export.checkpoint import load_adapter

    base = _pretraining_dir(tmp_path / "base")
    adapter = _classifier_adapter(base, tmp_path / "adapter")
    extra = "bert.encoder.layer.5.output.dense.weight"  # a 2-layer model has no layer 5
    _edit_weights(base, add={extra: torch.zeros(32, 64)})
    capfd.readouterr()
    load_adapter(adapter)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"unexpected {extra}" in warnings[0] and str(base) in warnings[0], err
    assert "cls." not in warnings[0] and "classifier" not in warnings[0]
    assert "LOAD REPORT" not in err, err


def test_generate_loads_a_causal_base_quietly_and_warns_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``python -m dora_lab.generate`` (and ``dora_lab.lm_eval``, the same ``load_causal``): a tiny Llama
    base with a key it has no place for is one ``warning:`` line, no table."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dora_lab import inject_adapters
    from dora_lab.core.checkpoint import save_adapter
    from dora_lab.export.generate import main as generate_main
    from tests.tiny import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    base = tmp_path / "llama"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    inject_adapters(model, r0=2)
    adapter = save_adapter(model, tmp_path / "adapter", base_model=str(base), num_labels=0)
    extra = "model.layers.7.mlp.up_proj.weight"
    _edit_weights(base, add={extra: torch.zeros(64, 32)})
    capfd.readouterr()
    assert generate_main([str(adapter), "--prompt", "hi", "--raw", "--max-new-tokens", "2"]) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"unexpected {extra}" in warnings[0], err
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err
