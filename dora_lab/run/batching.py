"""Tokenise rows once, batch them by length, pad each batch to its longest row.

:func:`make_loader` returns a :class:`TaskLoader` (a ``torch.utils.data.DataLoader``) whose
batches are dicts of tensors: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
tokenizer makes them), ``labels`` (``long``; ``float32`` for regression) and ``index``, each
row's position in the ``rows`` given.  Pop ``index`` before calling the model::

    loader = make_loader(rows, spec, tokenizer, batch_size=32, shuffle=True, seed=seed)
    for epoch in range(epochs):
        loader.set_epoch(epoch)          # a new seeded order per epoch; without it, every epoch
        for batch in loader:             # repeats epoch 0's order
            index = batch.pop("index")
            out = model(**batch)

With ``group_by_length`` (the default) training batches hold rows of similar length, like
Hugging Face's ``LengthGroupedSampler``: the rows are shuffled, cut into mega-batches of 50
batches, each mega-batch is sorted by length and split into batches, and the batch order is
shuffled.  Evaluation loaders (``shuffle=False``) are sorted by length; put predictions back
in row order with :func:`restore_order` (metrics over (prediction, label) pairs taken from the
same batches need no reordering).  Orders depend only on ``seed`` and the epoch.

Data-parallel runs (:mod:`dora_lab.run.distributed`) give each rank ``shards=N, shard=rank``: the
sampler builds the batches of ``N * batch_size`` rows that one process would, and each rank takes
its contiguous ``1/N`` of every batch, so the ranks' micro-batches together are the one-process
global batch.  A short last batch loses its last ``len % N`` rows, so every rank's share has the
same size (a mean loss averaged over the ranks is then the global batch's mean).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.labels import IGNORE_INDEX
from .causal import CausalEncoding, encode_causal
from .config import DEFAULT_MAX_LENGTH
from .config_yaml import ConfigError
from .packing import PackCollator
from .tasks import LABEL_COLUMN, TaskSpec

__all__ = ["Encoded", "LengthGroupedBatchSampler", "TaskLoader", "encode_rows", "loader_of", "make_loader", "padding_stats", "restore_order"]

Batch = dict[str, torch.Tensor]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of row positions, grouped by length and shuffled per (seed, epoch).

    ``shuffle=True, group_by_length=True``: shuffle, cut into mega-batches of
    ``mega_batch_mult`` batches, sort each by length (longest first), split into batches,
    shuffle the batch order.  ``shuffle=True`` alone: random batches.  ``shuffle=False``:
    batches in row order, or sorted by length (longest first, ties in row order) when grouped.
    Only the last batch may be short (dropped with ``drop_last``).  With ``shards > 1`` the
    batches above are built with ``shards * batch_size`` rows and shard ``shard`` of each is
    yielded (see the module docstring).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        group_by_length: bool = True,
        seed: int = 0,
        mega_batch_mult: int = 50,
        drop_last: bool = False,
        shards: int = 1,
        shard: int = 0,
    ) -> None:
        if not isinstance(shards, int) or shards < 1 or not 0 <= shard < shards:
            raise ValueError(f"shard must be in [0, shards) with shards >= 1, got shard {shard} of {shards}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult!r}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size * shards  # the global batch; each rank yields its part
        self.shards = shards
        self.shard = shard
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from the next iteration on (only matters with ``shuffle``)."""
        self.epoch = int(epoch)

    def _by_length(self, positions: np.ndarray) -> np.ndarray:
        # Stable sort on -length: equal lengths keep their (shuffled or row) order.
        return positions[np.argsort(-self.lengths[positions], kind="stable")]

    def _split(self, order: np.ndarray) -> list[list[int]]:
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def batches(self) -> list[list[int]]:
        """This epoch's batches (what iterating yields)."""
        n = len(self.lengths)
        if not self.shuffle:
            order = np.arange(n)
            batches = self._split(self._by_length(order) if self.group_by_length else order)
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(n)
            if self.group_by_length:
                mega = self.batch_size * self.mega_batch_mult
                batches = []
                for start in range(0, n, mega):
                    batches.extend(self._split(self._by_length(perm[start : start + mega])))
                batches = [batches[i] for i in rng.permutation(len(batches))]
            else:
                batches = self._split(perm)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shards > 1:
            batches = [b[self.shard * part : (self.shard + 1) * part]
                       for b in batches if (part := len(b) // self.shards) > 0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        full, rest = divmod(n, self.batch_size)
        return full + int(not self.drop_last and rest >= self.shards)


class Encoded(Dataset[dict[str, Any]]):
    """Token ids computed once; an item is one row's ids, label and position.

    A causal task's labels are token lists (``-100`` on the prompt); ``extras`` are more integer
    columns put in every batch (a prompt task's ``example`` and ``choice`` when scoring labels);
    ``causal`` is the :class:`~dora_lab.run.causal.CausalEncoding` it came from (its ``counts``:
    prompts cut, answers dropped)."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[Any],
                 extras: dict[str, list[int]] | None = None, causal: CausalEncoding | None = None) -> None:
        self.encodings = encodings
        self.labels = labels
        self.extras = extras or {}
        self.causal = causal
        self.lengths = [len(ids) for ids in encodings["input_ids"]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {key: values[i] for key, values in self.encodings.items()}
        item["labels"] = self.labels[i]
        item["index"] = i
        for key, values in self.extras.items():
            item[key] = values[i]
        return item


class _PadCollator:
    """Pads one batch to its longest row (dynamic padding) on the tokenizer's padding side.
    Token-level labels (causal tasks) are padded with ``-100``, so padding adds nothing to the loss."""

    def __init__(self, pad_token_id: int, left: bool, label_dtype: torch.dtype, extras: Sequence[str] = ()) -> None:
        self.pad = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        self.left = left
        self.label_dtype = label_dtype
        self.extras = tuple(extras)

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        width = max(len(item["input_ids"]) for item in items)
        batch: Batch = {}
        for key, pad in self.pad.items():
            if key not in items[0]:
                continue
            out = torch.full((len(items), width), pad, dtype=torch.long)
            for row, item in enumerate(items):
                ids = torch.as_tensor(item[key], dtype=torch.long)
                if self.left:
                    out[row, width - len(ids) :] = ids
                else:
                    out[row, : len(ids)] = ids
            batch[key] = out
        if isinstance(items[0]["labels"], list):
            labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
            for row, item in enumerate(items):
                n = len(item["labels"])
                (labels[row, width - n:] if self.left else labels[row, :n]).copy_(torch.as_tensor(item["labels"]))
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=self.label_dtype)
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        for key in self.extras:
            batch[key] = torch.tensor([item[key] for item in items], dtype=torch.long)
        return batch


class TaskLoader(DataLoader[dict[str, Any]]):
    """A DataLoader over a task's tokenised rows; :meth:`set_epoch` reshuffles."""

    def __init__(self, dataset: Encoded, sampler: LengthGroupedBatchSampler, collate: _PadCollator) -> None:
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate)
        self.length_sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s seeded order from the next iteration on (call once per epoch)."""
        self.length_sampler.set_epoch(epoch)

    def spread_batches(self, rows: int, per: int = 8) -> list[Batch]:
        """``rows`` rows spread evenly over the split in its row order (the first, the last and
        evenly between; all rows if there are fewer): a fixed sample whatever the seed, not the
        split's longest rows, which an evaluation loader's first batch (sorted by length) holds.
        They come sorted by length in batches of ``per``, each padded to its own longest row."""
        lengths = self.length_sampler.lengths
        n = len(lengths)
        picks = np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(int))
        picks = picks[np.argsort(-lengths[picks], kind="stable")].tolist()
        collate: Any = self.collate_fn
        return [collate([self.dataset[i] for i in picks[k : k + per]]) for k in range(0, len(picks), per)]


def make_loader(
    rows: Sequence[dict[str, Any]],
    spec: TaskSpec,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    shuffle: bool,
    group_by_length: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    shards: int = 1,
    shard: int = 0,
    prompt_format: str = "auto",
    score_labels: bool = False,
    packing: bool = False,
) -> TaskLoader:
    """A loader of padded batches of ``rows`` (from :func:`dora_lab.run.data.load_splits`).

    ``tokenizer`` is a Hugging Face tokenizer; pair tasks are encoded as sentence pairs,
    truncated together to ``max_length`` tokens.  See the module docstring for the batch keys,
    epochs and order, and for ``shards``/``shard`` (one rank's part of each global batch).

    A causal task's rows go through :func:`dora_lab.run.causal.encode_causal` (``prompt_format``,
    ``score_labels``): ``labels`` are token ids with ``-100`` on the prompt and the padding, and
    rows are padded on the right whatever the tokenizer's side (positions then start at 0 in every
    row; left padding is for generation).  With ``score_labels`` a prompt task's batches hold one
    row per (example, label) and two more keys, ``example`` and ``choice``.  With ``packing`` (a
    causal task's training rows) each batch's rows are packed (:class:`~dora_lab.run.packing.PackCollator`).
    """
    return loader_of(encode_rows(rows, spec, tokenizer, max_length=max_length, prompt_format=prompt_format,
                                 score_labels=score_labels),
                     spec, tokenizer, batch_size=batch_size, shuffle=shuffle, group_by_length=group_by_length,
                     seed=seed, drop_last=drop_last, shards=shards, shard=shard, packing=packing and not score_labels,
                     max_length=max_length)


def encode_rows(rows: Sequence[dict[str, Any]], spec: TaskSpec, tokenizer: Any, *, max_length: int = DEFAULT_MAX_LENGTH,
                prompt_format: str = "auto", score_labels: bool = False) -> Encoded:
    """The token rows of ``rows`` (what :func:`make_loader` batches): the one place a task's rows are
    tokenised, so a study can cache its result (:mod:`dora_lab.run.token_cache`)."""
    if not rows:
        raise ValueError(f"no rows to batch for {spec.name}")
    _check_pad(tokenizer)
    if spec.is_causal:
        causal = encode_causal(rows, spec, tokenizer, max_length=max_length, prompt_format=prompt_format,
                               score_labels=score_labels)
        extras = {"example": causal.example, "choice": causal.choice} if score_labels and not spec.is_instruction \
            else {}
        return Encoded({"input_ids": causal.input_ids,
                        "attention_mask": [[1] * len(ids) for ids in causal.input_ids]},
                       causal.labels, extras, causal)
    columns = [[row[field] for row in rows] for field in spec.text_fields]
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in enc else [])
    encodings = {key: list(enc[key]) for key in keys}
    return Encoded(encodings, [row[LABEL_COLUMN] for row in rows])


def loader_of(dataset: Encoded, spec: TaskSpec, tokenizer: Any, *, batch_size: int, shuffle: bool,
              group_by_length: bool = True, seed: int = 0, drop_last: bool = False, shards: int = 1,
              shard: int = 0, packing: bool = False, max_length: int = DEFAULT_MAX_LENGTH) -> TaskLoader:
    """A loader of padded batches of ``dataset`` (from :func:`encode_rows`); see :func:`make_loader`
    (``packing``: a causal task's training rows packed into sequences of at most ``max_length``)."""
    _check_pad(tokenizer)
    sampler = LengthGroupedBatchSampler(
        dataset.lengths,
        batch_size,
        shuffle=shuffle,
        group_by_length=group_by_length,
        seed=seed,
        drop_last=drop_last,
        shards=shards,
        shard=shard,
    )
    if packing:
        if not spec.is_causal or "example" in dataset.extras:
            raise ConfigError(f"train.packing joins a causal task's training rows, but {spec.name} is not a causal "
                              f"task; set train.packing: false")
        return TaskLoader(dataset, sampler, PackCollator(tokenizer.pad_token_id, max_length))  # type: ignore[arg-type]
    collate = _PadCollator(
        tokenizer.pad_token_id,
        left=getattr(tokenizer, "padding_side", "right") == "left" and not spec.is_causal,
        label_dtype=torch.float32 if spec.is_regression else torch.long,
        extras=tuple(dataset.extras),
    )
    return TaskLoader(dataset, sampler, collate)


def _check_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")


def padding_stats(loader: DataLoader[Any]) -> dict[str, float]:
    """Real vs padded tokens over one pass of ``loader`` (its current epoch).

    ``efficiency`` is real tokens / padded tokens (1.0: no padding at all).  For a
    :class:`TaskLoader` this is computed from the lengths alone; any other loader of batches with
    an ``attention_mask`` is iterated.
    """
    real = padded = batches = examples = 0
    dataset = loader.dataset
    if isinstance(loader, TaskLoader) and isinstance(dataset, Encoded):
        for batch in loader.length_sampler.batches():
            lengths = [dataset.lengths[i] for i in batch]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
            batches += 1
            examples += len(lengths)
    else:
        for b in loader:
            mask = b["attention_mask"]
            real += int(mask.sum())
            padded += mask.numel()
            batches += 1
            examples += mask.shape[0]
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "efficiency": real / padded if padded else 1.0,
        "batches": batches,
        "examples": examples,
    }


def restore_order(index: Any, values: Any) -> Any:
    """``values`` (gathered batch by batch) put back in row order, given the batches' ``index``.

    ``index`` is the concatenation of the batches' ``index`` tensors and ``values`` the matching
    concatenated outputs (torch tensors or numpy arrays, first dimension aligned); every row
    position must appear exactly once.
    """
    idx = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    if idx.ndim != 1 or len(idx) != len(values):
        raise ValueError(f"index has shape {idx.shape} but there are {len(values)} values; they must align")
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise ValueError("index must hold each position 0..n-1 exactly once (gather every batch of one pass)")
    if isinstance(values, torch.Tensor):
        return values[torch.as_tensor(order, device=values.device)]
    return np.asarray(values)[order]
