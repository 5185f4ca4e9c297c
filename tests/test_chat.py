"""Chat data (task ``chat``): ``messages`` rows, multi-turn, an optional ``system`` column, the loss
on the assistant turns only, checked against a slow per-turn computation whose contexts are the
ChatML text written by hand (not by the chat template); bad rows refused with their row number."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dora_lab.core.labels import IGNORE_INDEX
from dora_lab.run.batching import make_loader
from dora_lab.run.causal import encode_causal
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.generation import split_prompt_answer
from dora_lab.run.rows import DataError
from dora_lab.run.tasks import get_task
from dora_lab.run.train import train_run
from tests.tiny import REPO, make_tiny_llama_dir

CHAT = get_task("chat")
ROW = {"system": "You add numbers.",
       "messages": [{"role": "user", "content": "What is 3 plus 82?"},
                    {"role": "assistant", "content": "3 plus 82 is 85."},
                    {"role": "user", "content": "And 11 minus 3?"},
                    {"role": "assistant", "content": "11 minus 3 is 8."}]}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    folder = make_tiny_llama_dir(tmp_path_factory.mktemp("chat") / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights with some spread, so every token's probability differs
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return folder, model, tokenizer


def write(folder: Path, rows: list[dict[str, Any]], split: str = "validation") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if split != "train":
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_assistant_only_labels_match_a_slow_per_turn_computation(llama: tuple[Path, Any, Any],
                                                                 tmp_path: Path) -> None:
    _, model, tokenizer = llama
    rows = load_splits(CHAT, write(tmp_path / "d", [ROW]))["validation"]
    assert rows[0]["messages"][0] == {"role": "system", "content": "You add numbers."}  # the system column, first
    loader = make_loader(rows, CHAT, tokenizer, batch_size=4, max_length=256, shuffle=False)
    batch = next(iter(loader))
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    with torch.no_grad():
        mean = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss)

    # by hand: each assistant turn's answer after the ChatML text of everything before it
    ids = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    context = chatml("system", "You add numbers.") + chatml("user", "What is 3 plus 82?")
    turns = []
    for answer, user in (("3 plus 82 is 85.", "And 11 minus 3?"), ("11 minus 3 is 8.", None)):
        prompt = ids(context + "<|im_start|>assistant\n")
        answer_ids = ids(f"{answer}<|im_end|>\n")
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer_ids])).logits[0], dim=-1)
        turns.append((answer_ids, -sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(answer_ids))))
        context += chatml("assistant", answer) + (chatml("user", user) if user else "")
    assert labelled == turns[0][0] + turns[1][0]  # the answers and their end-of-turn tokens, nothing else
    assert batch["input_ids"][0].tolist() == ids(context)  # the whole conversation, as ChatML
    total = sum(nll for _, nll in turns)
    assert mean * len(labelled) == pytest.approx(total, rel=1e-6)  # HF takes its loss in float32
    assert not any(t in labelled for t in ids("What is 3 plus 82? And 11 minus 3? You add numbers.")
                   if t not in set(turns[0][0] + turns[1][0]))
    # the generation split: the last assistant turn is the reference, everything before it the prompt
    (prompt, reference), = split_prompt_answer(loader.dataset.causal)
    assert reference == turns[1][0] and prompt == ids(context)[:len(ids(context)) - len(reference)]


def test_a_long_chat_row_is_cut_from_the_left_and_a_too_long_last_answer_dropped(
        llama: tuple[Path, Any, Any]) -> None:
    _, _, tokenizer = llama
    rows = [{"messages": ROW["messages"], "idx": 0},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * 40}], "idx": 1}]
    full = encode_causal(rows[:1], CHAT, tokenizer, max_length=256)
    enc = encode_causal(rows, CHAT, tokenizer, max_length=20)
    assert enc.counts == {"examples": 2, "prompts_cut": 1, "answers_dropped": 1}
    assert enc.input_ids == [full.input_ids[0][-20:]] and enc.labels == [full.labels[0][-20:]]


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "turn 0 of 'messages' must be {role: system|user|assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "turn 0 of 'messages'"),
    ({"system": "s", "messages": [{"role": "system", "content": "t"}, {"role": "assistant", "content": "a"}]},
     "both a 'system' column and a system turn"),
    ({"system": 5, "messages": [{"role": "assistant", "content": "a"}]}, "'system' must be text"),
])
def test_bad_chat_rows_are_refused_with_their_row(row: dict[str, Any], message: str, tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    folder = write(tmp_path / "d", [good, row])
    with pytest.raises(DataError, match="row 2: ") as err:
        load_splits(CHAT, folder)
    assert message in str(err.value) and "fix that row" in str(err.value)


def test_chat_rows_need_a_chat_template(tmp_path: Path) -> None:
    folder = make_tiny_llama_dir(tmp_path / "plain", chat=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ConfigError, match="'messages' rows, which need the tokenizer's chat template"):
        encode_causal([ROW | {"idx": 0}], CHAT, tokenizer, max_length=128)


def test_a_chat_run_trains_and_scores_generated_last_answers(llama: tuple[Path, Any, Any], tmp_path: Path) -> None:
    folder = write(tmp_path / "d", [ROW] * 8)
    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", [
        f"model.name={llama[0]}", f"output_dir={tmp_path}", "task.name=chat", f"task.data_dir={folder}",
        "task.max_length=128", "train.max_steps=4", "train.batch_size=4", "train.eval_every=2",
        "schedule.interval=1", "train.lr=0.05", "eval.generate=true", "eval.max_new_tokens=4"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    first, last = result.initial_metrics, result.history[-1]
    assert math.isfinite(last["perplexity"]) and last["perplexity"] < first["perplexity"]
    assert {"gen_accuracy", "gen_tokens"} <= set(last)
