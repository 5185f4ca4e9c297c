"""Generation on tiny decoders: batched left-padded prompts give each prompt its one-at-a-time greedy
answer (checked against a slow token-by-token argmax without a cache), seeded sampling, the answer
rules worked by hand, generation-based scoring equal to a hand count, and the evaluation at step 0
in metrics.json and MLflow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from dora_lab.run.batching import make_loader
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.evaluate import GenerationEval, evaluate, response_nll
from dora_lab.run.generation import Sampling, answer_score, generate_ids, last_number, stop_ids
from dora_lab.run.tasks import get_task, language_model_metrics
from dora_lab.run.train import train_run
from dora_lab.track.tracker import StudyTracker
from tests.tiny import INSTRUCT, REPO, make_tiny_decoder_dir, make_tiny_llama_dir

CPU = torch.device("cpu")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    return {"llama": make_tiny_llama_dir(root / "llama"),
            "gpt2": make_tiny_decoder_dir(root / "gpt2", "gpt2", positions=256)}


def load(folder: Path) -> tuple[Any, Any]:
    """The model in float64 with every weight redrawn (std 0.3): a freshly initialised tiny model
    answers every prompt with the same token, which would hide a wrong prompt or position."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def slow_greedy(model: Any, prompt: list[int], n: int, stop: list[int]) -> list[int]:
    """Token by token: the full unpadded sequence through the model, the argmax of the last logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
    return ids[len(prompt):]


def prompts(tokenizer: Any, n: int = 6) -> list[list[int]]:
    rows = load_splits(get_task("instruct"), INSTRUCT, max_eval_samples=n)["validation"]
    # lengths differ by a lot, so the batch pads some prompts by many tokens
    texts = [r["prompt"] * (1 + i % 3) for i, r in enumerate(rows)]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


# -- batched generation --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_greedy_equals_one_at_a_time_and_the_slow_reference(kind: str, folders: dict[str, Path]) -> None:
    model, tokenizer = load(folders[kind])
    ps = prompts(tokenizer)
    assert len({len(p) for p in ps}) > 2
    stop, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    batched = generate_ids(model, ps, stop=stop, pad=pad, sampling=Sampling(max_new_tokens=10), batch_size=6)
    alone = [generate_ids(model, [p], stop=stop, pad=pad, sampling=Sampling(max_new_tokens=10))[0] for p in ps]
    assert batched == alone
    assert [slow_greedy(model, p, 10, stop) for p in ps] == alone
    assert any(len(a) == 10 for a in alone) and len({tuple(a) for a in alone}) > 3  # answers differ


def test_sampling_is_seeded_and_leaves_the_global_random_stream_alone(folders: dict[str, Path]) -> None:
    model, tokenizer = load(folders["llama"])
    ps = prompts(tokenizer, 3)
    kw = {"stop": stop_ids(model, tokenizer), "pad": tokenizer.pad_token_id}
    hot = Sampling(max_new_tokens=12, do_sample=True, temperature=5.0, top_p=1.0, seed=3)
    torch.manual_seed(123)
    first = generate_ids(model, ps, sampling=hot, **kw)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.rand(1) == after  # generating drew nothing from the caller's stream
    assert generate_ids(model, ps, sampling=hot, **kw) == first  # the same seed, the same samples
    assert generate_ids(model, ps, sampling=Sampling(12, True, 5.0, 1.0, seed=4), **kw) != first
    greedy = generate_ids(model, ps, sampling=Sampling(max_new_tokens=12), **kw)
    assert first != greedy  # a hot temperature leaves the argmax path
    # top_p near 0 keeps only the most likely token: sampling becomes greedy
    assert generate_ids(model, ps, sampling=Sampling(12, True, 5.0, 1e-9, seed=3), **kw) == greedy


# -- scoring -------------------------------------------------------------------------------------
def test_answer_rules_by_hand() -> None:
    assert answer_score("  34 is\nlarger. ", "34 is larger.", "exact")
    assert not answer_score("34 is larger", "34 is larger.", "exact")
    assert answer_score("3 + 82 = 85", "3 plus 82 is 85.", "last_number")
    assert not answer_score("3 + 82 = 23", "3 plus 82 is 85.", "last_number")  # the instruct answer
    assert not answer_score("eighty-five", "85", "last_number")
    assert last_number("1,024 or -2.50") == -2.5 and last_number("x = -.5") == -0.5 and last_number("none") is None
    assert answer_score("it is 1,024", "1024.0", "last_number")
    with pytest.raises(ValueError, match="eval.answer"):
        answer_score("a", "a", "fuzzy")


def test_generation_accuracy_is_the_share_of_rows_answered_as_by_hand(folders: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """Eight validation rows, each response written from the model's own slow greedy answer ``own``:
    rows 0, 2, 3 are ``own`` (an exact match), rows 1 and 4 ``zz 7``, row 5 ``own + "!"``, then two
    rows whose ``own`` holds a number: ``"x " + own`` (the same last number, not exact) and
    ``own + " 99999"`` (neither).  Exact match: 3/8; last number: counted below by hand."""
    model, tokenizer = load(folders["llama"])
    every = load_splits(get_task("instruct"), INSTRUCT)["validation"]
    stop = stop_ids(model, tokenizer)

    def own(row: dict[str, Any]) -> str:
        head = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = list(tokenizer(head, add_special_tokens=False)["input_ids"])
        return str(tokenizer.decode(slow_greedy(model, ids, 6, stop), skip_special_tokens=True))

    answers = [own(r) for r in every[:6]]
    with_number = [(r, o) for r in every[6:] if re.search(r"\d", o := own(r))][:2]
    assert len(with_number) == 2 and all(a.strip() for a in answers)
    rows = every[:6] + [r for r, _ in with_number]
    answers += [o for _, o in with_number]
    responses = [answers[0], "zz 7", answers[2], answers[3], "zz 7", answers[5] + "!",
                 "x " + answers[6], answers[7] + " 99999"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (data / "validation.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": resp}) + "\n"
                                                   for r, resp in zip(rows, responses, strict=True)))
    spec = get_task("instruct")
    loader = make_loader(load_splits(spec, data)["validation"], spec, tokenizer, batch_size=4, max_length=256,
                         shuffle=False)

    def score(rule: str, n: int | None = None) -> dict[str, float]:
        gen = GenerationEval(tokenizer, rule, Sampling(max_new_tokens=6), rows=n, batch_size=3)
        return evaluate(model, {"validation": loader}, spec, CPU, NO_AUTOCAST, gen)

    exact = score("exact")
    assert exact["gen_accuracy"] == 3 / 8
    assert exact["perplexity"] == language_model_metrics(*response_nll(model, loader, CPU, NO_AUTOCAST))["perplexity"]
    has = [re.search(r"\d", a) is not None for a in answers]
    seven = [re.search(r"7\D*$", a) is not None and re.search(r"\d7\D*$", a) is None for a in answers]
    by_hand = [has[0], seven[1], has[2], has[3], seven[4], has[5], True, False]
    assert score("last_number")["gen_accuracy"] == sum(by_hand) / 8
    assert score("exact", 2)["gen_accuracy"] == 1 / 2  # the first two rows only


# -- step 0 ----------------------------------------------------------------------------------------
def run_sets(folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={folder}", f"output_dir={out}", "task.max_length=256", f"task.data_dir={INSTRUCT}",
            "task.max_train_samples=16", "task.max_eval_samples=8", "train.max_steps=4", "train.batch_size=4",
            "train.eval_every=2", "schedule.interval=1", "train.lr=0.01", *extra]


def test_step_0_evaluation_is_the_base_models_in_metrics_json_and_mlflow(folders: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", run_sets(
        folders["llama"], tmp_path / "out", "eval.generate=true", "eval.rows=4", "eval.max_new_tokens=4",
        "eval.answer=last_number"))
    tracker = StudyTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "s", artifact_root=tmp_path / "art")
    logger = tracker.start_trial(tracker.parent_run("uid"), 0, cfg, tmp_path / "run")
    result = train_run(cfg, tmp_path / "run", [logger], progress=False)
    logger.finish("COMPLETE", value=result.best_metric)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    initial = saved["initial"]
    assert set(initial) == {"perplexity", "loss", "gen_accuracy", "gen_tokens"}
    assert all(set(h) >= {"perplexity", "gen_accuracy", "gen_tokens", "step"} for h in saved["history"])
    assert [h["step"] for h in saved["history"]] == [2, 4]  # step 0 is not a candidate for the best

    # the base model's own perplexity, computed apart from the run
    model = AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    tokenizer.pad_token = tokenizer.eos_token
    spec = get_task("instruct")
    rows = load_splits(spec, INSTRUCT, max_train_samples=16, max_eval_samples=8, seed=0)["validation"]
    loader = make_loader(rows, spec, tokenizer, batch_size=32, max_length=256, shuffle=False)
    base = language_model_metrics(*response_nll(model, loader, CPU, NO_AUTOCAST))
    assert initial["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    assert saved["history"][-1]["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)  # training moved it

    client = MlflowClient(tracker.uri)
    curve = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, "eval/perplexity"))
    assert [s for s, _ in curve] == [0, 2, 4] and curve[0][1] == pytest.approx(initial["perplexity"])
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "eval/gen_accuracy")) == [0, 2, 4]


def test_step_0_evaluation_changes_nothing_else_and_can_be_off(folders: dict[str, Path], tmp_path: Path) -> None:
    on = train_run(load_config(REPO / "configs" / "smollm2_instruct.yaml", run_sets(folders["llama"], tmp_path)),
                   tmp_path / "on", progress=False)
    off = train_run(load_config(REPO / "configs" / "smollm2_instruct.yaml",
                                run_sets(folders["llama"], tmp_path, "eval.at_start=false")), tmp_path / "off",
                    progress=False)
    assert on.history == off.history and math.isfinite(on.initial_metrics["perplexity"])
    assert off.initial_metrics == {} and "initial" not in json.loads((tmp_path / "off" / "metrics.json").read_text())


def test_generation_on_a_task_without_responses_is_refused_before_work(folders: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "smollm2_cola.yaml", [f"model.name={folders['llama']}",
                                                               f"output_dir={tmp_path}", "eval.generate=true"])
    with pytest.raises(ConfigError, match="eval.generate scores generated answers of instruction data"):
        train_run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
