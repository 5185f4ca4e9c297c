"""python -m dora_lab.generate: greedy text from a saved causal-LM adapter on a tiny Llama with a real
tokenizer and a chat template; the adapted and the merged model give the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_c
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dora_lab import adapter_layers, inject_adapters
from dora_lab.core.checkpoint import save_adapter
from dora_lab.export.checkpoint import load_adapter
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


# -- batches, sampling, half-precision export ------------------------------------------------------------
PROMPTS = ["is this sentence grammatical ?", "the cat sat on the mat , did it not , and then it slept",
           "why ?"]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_batched_prompts_answer_as_one_at_a_time(saved: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Three prompts of different lengths in one left-padded batch (two from --prompts-file) give
    each the text that prompt gets alone, in order, one JSON line each."""
    _, run = saved
    (tmp_path / "prompts.txt").write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")
    code, out, err = _cli([str(run), "--prompt", PROMPTS[0], "--prompts-file", str(tmp_path / "prompts.txt"),
                           "--batch-size", "3", "--max-new-tokens", "10"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS
    alone = []
    for prompt in PROMPTS:
        code, text, _ = _cli([str(run), "--prompt", prompt, "--max-new-tokens", "10"], capsys)
        alone.append(text.removesuffix("\n"))
    assert [line["answer"] for line in lines] == alone and len(set(alone)) == 3


def test_cli_sampling_is_seeded_and_leaves_greedy(saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, run = saved
    base = [str(run), "--prompt", PROMPTS[0], "--max-new-tokens", "12"]
    greedy = _cli(base, capsys)[1]
    hot = [*base, "--temperature", "3", "--top-p", "0.95", "--seed", "1"]
    first = _cli(hot, capsys)[1]
    assert _cli(hot, capsys)[1] == first != greedy
    assert _cli([*base, "--temperature", "3", "--top-p", "0.95", "--seed", "2"], capsys)[1] != first


@pytest.mark.parametrize(("flags", "message"), [
    (["--top-p", "0"], "--top-p must be above 0 and at most 1, got 0.0"),
    (["--temperature", "-1"], "--temperature must be 0 or more"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_sampling_settings_exit_2_before_loading(saved: tuple[Path, Path], flags: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli([str(saved[1]), "--prompt", "hi", *flags], capsys)
    assert code == 2 and message in err and "Nothing was started" in err


def test_no_prompt_is_refused(saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli([str(saved[1])], capsys)
    assert code == 2 and "no prompt: give --prompt TEXT" in err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_export_in_half_precision_is_the_float32_merge_cast(saved: tuple[Path, Path], tmp_path: Path,
                                                                   dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    from dora_lab.export.cli import main as export_main

    _, run = saved
    name = str(dtype).removeprefix("torch.")
    assert export_main([str(run), "--to", "merged", str(tmp_path / "m32")]) == 0
    assert export_main([str(run), "--to", "merged", str(tmp_path / "half"), "--dtype", name]) == 0
    full, half = load_file(str(tmp_path / "m32" / "model.safetensors")), load_file(str(tmp_path / "half" / "model.safetensors"))
    assert full.keys() == half.keys() and all(t.dtype == torch.float32 for t in full.values())
    for key, weight in full.items():  # merged in float32, then rounded once
        assert half[key].dtype == dtype and torch.equal(half[key], weight.to(dtype)), key
    model = LlamaForCausalLM.from_pretrained(tmp_path / "half")
    assert model.dtype == dtype and json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == name
    assert (tmp_path / "half" / "tokenizer_config.json").is_file()


def test_dtype_with_a_peft_export_is_refused(saved: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from dora_lab.export.cli import main as export_main

    assert export_main([str(saved[1]), "--to", "peft", str(tmp_path / "p"), "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 applies to --to merged" in capsys.readouterr().err and not (tmp_path / "p").exists()
