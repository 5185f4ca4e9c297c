"""Causal-LM tasks on a tiny random Llama: tokens and labels, truncation, the masked LM loss, the
perplexity and the label log-likelihood scoring, each against a slow direct computation (one
example at a time, unpadded, a plain loop over its tokens)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import COLA, INSTRUCT, make_tiny_llama_dir, make_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from dora_lab.core.labels import IGNORE_INDEX
from dora_lab.run.batching import make_loader
from dora_lab.run.causal import encode_causal, prompt_of, uses_chat
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.evaluate import evaluate, label_log_likelihoods, response_nll
from dora_lab.run.rows import DataError
from dora_lab.run.tasks import (
    PROMPT_TEMPLATES,
    TaskSpec,
    compute_metrics,
    get_task,
    language_model_metrics,
    prompt_task,
)

NO_AUTOCAST = torch.autocast("cpu", enabled=False)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    folder = make_tiny_llama_dir(tmp_path_factory.mktemp("llama") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    return model, tok


def instruct_rows(n: int = 12) -> list[dict[str, Any]]:
    return load_splits(get_task("instruct"), INSTRUCT, max_eval_samples=n)["validation"]


def slow_answer_log_likelihood(model: Any, ids: list[int], n_prompt: int) -> tuple[float, int]:
    """Sum of log p(token t | tokens < t) over the answer tokens t >= n_prompt, one unpadded row."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(n_prompt, len(ids)):
        total += float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
    return total, len(ids) - n_prompt


# -- tokens and labels ---------------------------------------------------------------------------
def test_instruction_rows_mask_the_prompt_and_end_with_eos_in_plain_format() -> None:
    tok = make_tiny_tokenizer(chat=False)
    rows = instruct_rows(4)
    enc = encode_causal(rows, get_task("instruct"), tok, max_length=256)
    for row, ids, labels in zip(rows, enc.input_ids, enc.labels, strict=True):
        prompt = tok(row["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        answer = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt + answer  # no bos: this tokenizer's own encoding adds none
        assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert enc.counts == {"examples": 4, "prompts_cut": 0, "answers_dropped": 0}


def test_the_chat_template_is_used_when_the_tokenizer_has_one() -> None:
    tok = make_tiny_tokenizer(chat=True)
    assert uses_chat(tok, "auto") and not uses_chat(tok, "plain")
    assert not uses_chat(make_tiny_tokenizer(chat=False), "auto")
    with pytest.raises(ConfigError, match="task.prompt_format is 'chat' but the tokenizer has no chat template"):
        uses_chat(make_tiny_tokenizer(chat=False), "chat")
    row = instruct_rows(1)[0]
    enc = encode_causal([row], get_task("instruct"), tok, max_length=256)
    text = tok.decode(enc.input_ids[0])
    assert text == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n{row['response']}<|im_end|>\n"
    answer = [t for t in enc.labels[0] if t != IGNORE_INDEX]
    assert tok.decode(answer) == f"{row['response']}<|im_end|>\n"  # the end of the turn is learned too
    # a verbaliser opens the assistant's turn without its leading space, and nothing follows it
    cola = get_task("cola_prompt")
    enc = encode_causal([{"sentence": "Dogs bark.", "label": 1, "idx": 0}], cola, tok, max_length=256)
    assert tok.decode(enc.input_ids[0]).endswith("Answer:<|im_end|>\n<|im_start|>assistant\nyes")


def test_a_long_prompt_is_cut_from_its_left_and_a_too_long_answer_is_dropped() -> None:
    tok = make_tiny_tokenizer(chat=False)
    spec = get_task("instruct")
    short = {"prompt": "What is 2 plus 2?", "response": "4.", "idx": 0}
    long = {"prompt": "word " * 40 + "What is 3 plus 3?", "response": "6.", "idx": 1}
    huge = {"prompt": "Say it.", "response": "many words " * 30, "idx": 2}
    enc = encode_causal([short, long, huge], spec, tok, max_length=24)
    assert enc.counts == {"examples": 3, "prompts_cut": 1, "answers_dropped": 1}
    assert enc.example == [0, 1]  # the huge answer's row is gone
    full = tok(long["prompt"] + "\n", add_special_tokens=False)["input_ids"]
    answer = tok("6.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(enc.input_ids[1]) == 24
    assert enc.input_ids[1] == full[len(full) - (24 - len(answer)):] + answer  # the prompt's end, the whole answer
    assert enc.labels[1][-len(answer):] == answer and set(enc.labels[1][:-len(answer)]) == {IGNORE_INDEX}
    with pytest.raises(ConfigError, match="all were dropped; raise task.max_length"):
        encode_causal([huge], spec, tok, max_length=24)


def test_a_prompt_task_cuts_every_prompt_to_leave_room_for_its_longest_verbaliser() -> None:
    tok = make_tiny_tokenizer(chat=False)
    spec = prompt_task(get_task("cola"), "Is this grammatical? {sentence}\nAnswer:", [" no", " yes indeed"], name="t")
    row = {"sentence": "the cat " * 30 + "sat.", "label": 0, "idx": 0}
    enc = encode_causal([row], spec, tok, max_length=20, score_labels=True)
    verbs = [tok(v, add_special_tokens=False)["input_ids"] for v in spec.verbalizers]
    assert len(verbs[0]) < len(verbs[1])
    prompt_len = 20 - len(verbs[1])
    full = tok(prompt_of(spec, row), add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [full[-prompt_len:] + verbs[0], full[-prompt_len:] + verbs[1]]
    assert enc.choice == [0, 1] and enc.example == [0, 0] and enc.gold == {0: 0}
    assert enc.counts["prompts_cut"] == 1  # one example, counted once
    train = encode_causal([row], spec, tok, max_length=20)  # training: the gold verbaliser only
    assert train.input_ids == [full[-prompt_len:] + verbs[0]] and train.choice == [0]
    assert train.labels == [[IGNORE_INDEX] * prompt_len + verbs[0]]  # the LM loss is on the verbaliser alone


# -- the loss, the perplexity, the label scores --------------------------------------------------
def test_the_batch_loss_is_the_mean_nll_of_the_response_tokens(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    rows = instruct_rows(6)
    loader = make_loader(rows, get_task("instruct"), tok, batch_size=6, max_length=256, shuffle=False)
    batch = next(iter(loader))
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"].all()  # padded on the right
    assert ((batch["labels"] == IGNORE_INDEX) | (batch["attention_mask"] == 1)).all()  # padding is -100
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    enc = loader.dataset.causal
    total, tokens = 0.0, 0
    for ids, labels in zip(enc.input_ids, enc.labels, strict=True):
        n_prompt = sum(1 for t in labels if t == IGNORE_INDEX)
        lp, n = slow_answer_log_likelihood(model, ids, n_prompt)
        total, tokens = total - lp, tokens + n
    assert float(loss) == pytest.approx(total / tokens, rel=1e-6)  # HF computes its loss in float32


def test_perplexity_is_token_weighted_over_the_whole_split(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    rows = instruct_rows(10)
    spec = get_task("instruct")
    loader = make_loader(rows, spec, tok, batch_size=3, max_length=256, shuffle=False, prompt_format="plain")
    metrics = evaluate(model, {"validation": loader}, spec, CPU, NO_AUTOCAST)
    total, tokens, per_example = 0.0, 0, []
    for row in rows:
        prompt = tok(row["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        answer = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lp, n = slow_answer_log_likelihood(model, prompt + answer, len(prompt))
        total, tokens = total - lp, tokens + n
        per_example.append(-lp / n)
    assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-9)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-9)
    assert metrics["loss"] != pytest.approx(float(np.mean(per_example)), rel=1e-6)  # not a mean of means
    assert response_nll(model, loader, CPU, NO_AUTOCAST) == pytest.approx((total, tokens), rel=1e-9)
    assert language_model_metrics(3 * math.log(2.0), 3) == {"perplexity": pytest.approx(2.0), "loss": math.log(2.0)}


def test_labels_are_scored_by_their_verbalisers_total_log_likelihood(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    # unequal multi-token verbalisers: a mean per token would rank them differently from the total
    spec = prompt_task(get_task("sst2"), "Review: {sentence}\nSentiment:", [" bad", " very good indeed"],
                       name="sst2_test")
    rows = [{"sentence": s, "label": i % 2, "idx": i}
            for i, s in enumerate(["A fine film.", "Dull.", "I loved every minute of it.", "Not for me.",
                                   "Bright, warm and funny.", "Two hours lost."])]
    loader = make_loader(rows, spec, tok, batch_size=4, max_length=256, shuffle=False, score_labels=True,
                         prompt_format="plain")
    scores, gold = label_log_likelihoods(model, loader, CPU, NO_AUTOCAST)
    assert scores.shape == (6, 2) and gold.tolist() == [0, 1, 0, 1, 0, 1]
    for i, row in enumerate(rows):  # slow: each (example, label) on its own, unpadded
        prompt = tok(prompt_of(spec, row), add_special_tokens=False)["input_ids"]
        for j, verbaliser in enumerate(spec.verbalizers):
            answer = tok(verbaliser, add_special_tokens=False)["input_ids"]
            expected, n = slow_answer_log_likelihood(model, prompt + answer, len(prompt))
            assert n == len(answer) and scores[i, j] == pytest.approx(expected, rel=1e-9)
    metrics = evaluate(model, {"validation": loader}, spec, CPU, NO_AUTOCAST)
    assert metrics == compute_metrics(spec, scores.argmax(axis=1), gold)


def test_one_token_verbalisers_score_every_label_from_one_row(llama: tuple[Any, Any]) -> None:
    model, tok = llama
    spec = prompt_task(get_task("rte"), "{sentence1} So {sentence2} Answer:", [" the", " plus"],
                       name="rte_test")
    assert [len(tok.tokenize(v)) for v in spec.verbalizers] == [1, 1]
    rows = [{"sentence1": a, "sentence2": b, "label": i % 2, "idx": i}
            for i, (a, b) in enumerate([("It rained.", "The ground is wet."), ("Two cats.", "No animals."),
                                        ("He sold it.", "He had it."), ("A red car.", "A car.")])]
    loader = make_loader(rows, spec, tok, batch_size=3, max_length=256, shuffle=False, score_labels=True,
                         prompt_format="plain")
    assert len(loader.dataset) == 4  # one row per example, not per label
    scores, gold = label_log_likelihoods(model, loader, CPU, NO_AUTOCAST)
    assert gold.tolist() == [0, 1, 0, 1]
    for i, row in enumerate(rows):
        prompt = tok(prompt_of(spec, row), add_special_tokens=False)["input_ids"]
        for j, verbaliser in enumerate(spec.verbalizers):
            expected, _ = slow_answer_log_likelihood(model, prompt + tok(verbaliser)["input_ids"], len(prompt))
            assert scores[i, j] == pytest.approx(expected, rel=1e-9)


# -- tasks as data ------------------------------------------------------------------------------
def test_glue_prompt_tasks_keep_their_glue_metrics_and_label_order() -> None:
    assert {"cola", "sst2", "rte", "mrpc"} <= set(PROMPT_TEMPLATES)
    for glue in PROMPT_TEMPLATES:
        base, spec = get_task(glue), get_task(f"{glue}_prompt")
        assert spec.is_causal and not spec.is_instruction and spec.greater_is_better
        assert (spec.metrics, spec.main_metric, spec.text_fields, spec.eval_splits) == (
            base.metrics, base.main_metric, base.text_fields, base.eval_splits)
        assert len(spec.verbalizers) == base.num_labels
    assert get_task("cola_prompt").verbalizers == (" no", " yes")  # label 1 = acceptable
    assert get_task("rte_prompt").verbalizers == (" yes", " no")  # label 0 = entailment
    assert get_task("cola_prompt").prompt.startswith("Is this sentence grammatical?")
    instruct = get_task("instruct")
    assert instruct.metrics == ("perplexity", "loss") and not instruct.greater_is_better


def test_bad_prompt_tasks_are_refused_when_registered() -> None:
    cola = get_task("cola")
    with pytest.raises(ValueError, match="must be 2 distinct non-blank texts"):
        prompt_task(cola, "{sentence} Answer:", [" yes", " yes"])
    with pytest.raises(ValueError, match="placeholders of its text fields only"):
        prompt_task(cola, "{sentense} Answer:", [" no", " yes"])
    with pytest.raises(ValueError, match="a causal task cannot be a regression"):
        prompt_task(get_task("stsb"), "{sentence1} {sentence2}", [" x"])
    with pytest.raises(ValueError, match="set kind='causal'"):
        dataclasses.replace(cola, prompt="{sentence}")


def test_instruction_files_load_with_renamed_columns(tmp_path: Path) -> None:
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"question": "Hi?", "answer": "Hello."}) + "\n")
    spec = get_task("instruct")
    splits = load_splits(spec, tmp_path, columns={"question": "prompt", "answer": "response"})
    assert splits["validation"] == [{"prompt": "Hi?", "response": "Hello.", "idx": 0}]
    with pytest.raises(DataError, match=r"no column 'prompt'.*map it with task.columns"):
        load_splits(spec, tmp_path)
    with pytest.raises(DataError, match="task.columns maps 'question': 'promt'"):
        load_splits(spec, tmp_path, columns={"question": "promt"})
    with pytest.raises(DataError, match="has no Hugging Face Hub dataset: set task.data_dir"):
        load_splits(spec, None)


def test_the_shipped_instruction_set_is_what_its_script_writes(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_instruct_data.py"
    module_spec = importlib.util.spec_from_file_location("make_instruct_data", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.main(tmp_path) == 0
    for split, n in (("train", 400), ("validation", 100)):
        shipped = (INSTRUCT / f"{split}.jsonl").read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == shipped
        rows = [json.loads(line) for line in shipped.decode().splitlines()]
        assert len(rows) == n and all(set(r) == {"prompt", "response"} for r in rows)
    train = {json.loads(x)["prompt"] for x in (INSTRUCT / "train.jsonl").read_text().splitlines()}
    assert not train & {json.loads(x)["prompt"] for x in (INSTRUCT / "validation.jsonl").read_text().splitlines()}


def test_real_cola_rows_become_prompts(llama: tuple[Any, Any]) -> None:
    if not (COLA / "validation.jsonl").is_file() and not (COLA / "dev.tsv").is_file():
        pytest.skip(f"shared CoLA not found at {COLA}")
    _, tok = llama
    rows = load_splits(get_task("cola_prompt"), COLA, max_train_samples=8, max_eval_samples=8)["validation"]
    spec: TaskSpec = get_task("cola_prompt")
    enc = encode_causal(rows, spec, tok, max_length=256, prompt_format="plain", score_labels=True)
    assert len(enc.input_ids) == 16 and sorted(enc.gold) == list(range(8))
    assert tok.decode(enc.input_ids[0]).startswith(f"Is this sentence grammatical?\nSentence: {rows[0]['sentence']}")


def test_a_validation_loss_over_several_batches_is_the_one_batch_loss(llama: tuple[Any, Any]) -> None:
    """alora's validation loss over length-sorted batches of 8 weighs each by its predicted tokens,
    so it equals the loss of the same rows in one batch."""
    from dora_lab.run.validation import ValidationLoss

    model, tok = llama
    loader = make_loader(instruct_rows(12), get_task("instruct"), tok, batch_size=12, max_length=256, shuffle=False)
    parts = [{k: v for k, v in b.items() if k != "index"} for b in loader.spread_batches(12, per=5)]
    assert [len(b["labels"]) for b in parts] == [5, 5, 2]
    whole = {k: v for k, v in next(iter(loader)).items() if k != "index"}
    with torch.no_grad():
        one = float(model(**whole).loss)
    assert ValidationLoss(model, parts, NO_AUTOCAST)() == pytest.approx(one, rel=1e-6)
    assert not model.training  # the fixture's eval mode is restored
