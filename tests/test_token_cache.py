"""Tokenised splits cached once per study (dora_lab.run.token_cache): cached runs tokenise once and
give exactly the uncached run's batches and metrics; the key follows everything the tokens depend on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dora_lab.run import token_cache
from dora_lab.run.config import load_config
from dora_lab.run.models import load_model_and_tokenizer
from dora_lab.run.tasks import get_task
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, make_tiny_model_dir, make_tiny_tokenizer, tiny_overrides

pytestmark = pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "bert")


def _cfg(tiny_dir: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    sets = [*tiny_overrides(tiny_dir, out, train=96, evals=64), "train.max_steps=4", "train.eval_every=2", *extra]
    return load_config(REPO / "configs" / "cola.yaml", sets)


@pytest.fixture
def encode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the real tokenisations (the real encode_rows runs; only the calls are recorded)."""
    calls: list[str] = []
    real = token_cache.encode_rows

    def counted(rows: Any, spec: Any, tokenizer: Any, **kw: Any) -> Any:
        calls.append(spec.name)
        return real(rows, spec, tokenizer, **kw)

    monkeypatch.setattr(token_cache, "encode_rows", counted)
    return calls


def test_cached_runs_tokenise_once_and_match_the_uncached_run(tiny_dir: Path, tmp_path: Path,
                                                              encode_calls: list[str]) -> None:
    cfg = _cfg(tiny_dir, tmp_path)
    plain = train_run(cfg, tmp_path / "plain", progress=False)
    assert len(encode_calls) == 2  # train and validation, tokenised for this run
    cache = tmp_path / "cache"
    first = train_run(cfg, tmp_path / "c1", progress=False, data_cache=cache)
    assert len(encode_calls) == 4  # a miss: tokenised and written
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("tokens-cola-")
    stamp = files[0].stat().st_mtime_ns
    second = train_run(cfg, tmp_path / "c2", progress=False, data_cache=cache)
    assert len(encode_calls) == 4  # a hit: nothing tokenised, the file not rewritten
    assert files[0].stat().st_mtime_ns == stamp and list(cache.iterdir()) == files
    for run in (first, second):
        assert run.history == plain.history  # the same batches give bit-identical losses and metrics
        assert run.allocation == plain.allocation


def test_cached_splits_give_the_same_batches(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dir, tmp_path)
    spec = get_task("cola")
    _, tokenizer = load_model_and_tokenizer(str(tiny_dir), spec.num_labels)
    fresh = token_cache.encoded_splits(cfg, spec, tokenizer)
    token_cache.encoded_splits(cfg, spec, tokenizer, tmp_path / "cache")  # written
    read = token_cache.encoded_splits(cfg, spec, tokenizer, tmp_path / "cache")  # read back
    for split in ("train", "validation"):
        assert read[split].encodings == fresh[split].encodings and read[split].labels == fresh[split].labels
        assert read[split].lengths == fresh[split].lengths


def test_a_prompt_tasks_scoring_rows_round_trip(tmp_path: Path) -> None:
    """A causal task's extras and CausalEncoding (gold keyed by int positions) come back as built."""
    tok: Any = make_tiny_tokenizer(chat=False)
    tok.pad_token = tok.eos_token
    cfg = load_config(REPO / "configs" / "cola.yaml", [f"task.data_dir={COLA}", "task.name=cola_prompt",
                                                       "task.max_train_samples=8", "task.max_eval_samples=6"])
    spec = get_task("cola_prompt")
    fresh = token_cache.encoded_splits(cfg, spec, tok, tmp_path)
    read = token_cache.encoded_splits(cfg, spec, tok, tmp_path)
    for split in ("train", "validation"):
        assert read[split].causal == fresh[split].causal and read[split].extras == fresh[split].extras
        assert read[split].labels == fresh[split].labels and read[split].encodings == fresh[split].encodings
    assert read["validation"].causal is not None and read["validation"].causal.gold
    assert all(isinstance(k, int) for k in read["validation"].causal.gold)


def test_the_key_follows_what_the_tokens_depend_on(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "cola"
    shutil.copytree(COLA, data)
    spec = get_task("cola")
    _, tokenizer = load_model_and_tokenizer(str(tiny_dir), spec.num_labels)

    def key(*sets: str) -> str:
        return token_cache.cache_key(load_config(REPO / "configs" / "cola.yaml", [f"task.data_dir={data}", *sets]),
                                     spec, tokenizer)

    base = key()
    assert key("seed=7") == base  # no subset: the seed does not change the rows
    assert key("task.max_train_samples=50") != base
    assert key("task.max_train_samples=50", "seed=7") != key("task.max_train_samples=50")  # the seed picks them
    assert key("task.max_length=48") != base
    other: Any = make_tiny_tokenizer(chat=False)
    other.pad_token = other.eos_token
    cfg = load_config(REPO / "configs" / "cola.yaml", [f"task.data_dir={data}"])
    assert token_cache.cache_key(cfg, spec, other) != base
    train = next(p for p in data.iterdir() if p.name.startswith("train"))
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))  # the file changed
    assert key() != base


def test_eval_batches_are_sorted_by_length(tiny_dir: Path, tmp_path: Path) -> None:
    from dora_lab.run.batching import loader_of

    cfg = _cfg(tiny_dir, tmp_path)
    spec = get_task("cola")
    _, tokenizer = load_model_and_tokenizer(str(tiny_dir), spec.num_labels)
    enc = token_cache.encoded_splits(cfg, spec, tokenizer)["validation"]
    loader = loader_of(enc, spec, tokenizer, batch_size=16, shuffle=False, group_by_length=True)
    widths = [int(b["attention_mask"].sum(1).max()) for b in loader]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
    assert torch.cat([b["index"] for b in loader]).sort().values.tolist() == list(range(len(enc)))
