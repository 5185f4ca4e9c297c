"""python -m dora_lab.generate: greedy text from a saved causal-LM adapter on a tiny Llama with a real
tokenizer and a chat template; the adapted and the merged model give the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_c
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dora_lab import adapter_layers, inject_adapters
from dora_lab.export.checkpoint import load_adapter, save_adapter
from dora_lab.export.generate import generate_text, main, prompt_ids
from dora_lab.export.merge import merged_model
from tests.tiny import make_tiny_model_dir, minilm_dir

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
PROMPT = "is this sentence grammatical ?"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama (MiniLM's vocabulary, so a real tokenizer fits) with a trained-looking adapter:
    ``(base folder, run folder)``."""
    root = tmp_path_factory.mktemp("gen")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(1)
    inject_adapters(base, r0=3, dropout=0.1)
    randomize_c(base, 3)
    with torch.no_grad():  # an update large enough to change the greedy tokens
        for layer in adapter_layers(base).values():
            layer.c.mul_(3.0)
    save_adapter(base, root / "run" / "adapter", base_model=str(root / "base"), num_labels=0)
    return root / "base", root / "run"


def test_the_prompt_goes_through_the_chat_template(saved: tuple[Path, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(saved[0])
    ids = prompt_ids(tokenizer, PROMPT, system="be brief")
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith("[ system ] be brief [ user ] is this sentence grammatical?") and text.endswith(
        "[ assistant ]"), text
    raw = prompt_ids(tokenizer, PROMPT, raw=True)
    assert tokenizer.decode(raw[0], skip_special_tokens=True) == "is this sentence grammatical?"


def test_adapted_and_merged_models_generate_the_same_tokens(saved: tuple[Path, Path]) -> None:
    base_dir, run = saved
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapted = load_adapter(run / "adapter")
    assert type(adapted) is LlamaForCausalLM
    text, tokens = generate_text(adapted, tokenizer, PROMPT, max_new_tokens=12)
    merged = merged_model(adapted)
    assert not adapter_layers(merged)
    assert generate_text(merged, tokenizer, PROMPT, max_new_tokens=12) == (text, tokens)
    plain = LlamaForCausalLM.from_pretrained(base_dir)
    assert generate_text(plain, tokenizer, PROMPT, max_new_tokens=12)[1] != tokens  # the adapter acts
    assert len(tokens) == 12 or tokens[-1] == tokenizer.sep_token_id


def test_cli_prints_the_same_text_unmerged_and_merged(saved: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, run = saved
    texts = []
    for extra in ([], ["--merged"]):
        assert main([str(run), "--prompt", PROMPT, "--max-new-tokens", "12", *extra]) == 0
        out = capsys.readouterr()
        texts.append(out.out)
        assert ("merged model" if extra else "adapted model") in out.err
    assert texts[0] == texts[1] and texts[0].strip()
    tokenizer = AutoTokenizer.from_pretrained(saved[0])
    assert texts[0].strip() == generate_text(load_adapter(run / "adapter"), tokenizer, PROMPT,
                                             max_new_tokens=12)[0].strip()


def test_a_classifier_adapter_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    model_dir = make_tiny_model_dir(tmp_path / "bert")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    inject_adapters(model, r0=2)
    save_adapter(model, tmp_path / "adapter", base_model=str(model_dir), num_labels=2)
    assert main([str(tmp_path / "adapter"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "BertForSequenceClassification, not a causal language model" in err and "Nothing was started" in err
