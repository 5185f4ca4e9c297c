"""Packing: a batch's short rows joined into a few long sequences, each token attending to its own
row only (``train.packing``, causal tasks).

:class:`PackCollator` takes the rows a batch would hold anyway (the sampler is unchanged) and puts
them into as few sequences of at most ``max_length`` tokens as it can (first-fit, longest row
first).  Each row's ``position_ids`` start at 0 and the batch has no ``attention_mask``: from
the restarting positions transformers builds a block-diagonal causal mask (its packed-sequence
detection, ``masking_utils.find_packed_sequence_indices``, used when no attention mask and no KV
cache are given, so the model must run with ``use_cache=False``).  The tail padding of a
sequence is a block of its own.  The first token of every row is unlabelled (nothing before it
in its row predicts it), so the loss, a mean over the labelled tokens, is the unpacked batch's
loss; checked in tests/test_packing.py.  The compute saved is the padding of rows of unequal
length, largest with ``train.group_by_length: false``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.labels import IGNORE_INDEX

__all__ = ["PackCollator", "check_packing", "pack_rows"]

Batch = dict[str, torch.Tensor]


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Row positions grouped into sequences of at most ``max_length`` tokens: first-fit, the
    longest row first; within a sequence the rows keep the batch's order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(max_length)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(b) for b in bins]


class PackCollator:
    """Packs one batch of causal rows (see the module docstring): ``input_ids``, ``position_ids``,
    ``labels`` (``-100`` on each row's first token and the padding) and ``index`` (every row's)."""

    def __init__(self, pad_token_id: int, max_length: int) -> None:
        self.pad = pad_token_id
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        bins = pack_rows([len(item["input_ids"]) for item in items], self.max_length)
        width = max(sum(len(items[i]["input_ids"]) for i in b) for b in bins)
        ids = torch.full((len(bins), width), self.pad, dtype=torch.long)
        labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        for row, members in enumerate(bins):
            at = 0
            for i in members:
                n = len(items[i]["input_ids"])
                ids[row, at:at + n] = torch.as_tensor(items[i]["input_ids"])
                labels[row, at:at + n] = torch.as_tensor(items[i]["labels"])
                labels[row, at] = IGNORE_INDEX
                positions[row, at:at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(width - at)  # the padding: a block of its own
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return {"input_ids": ids, "position_ids": positions, "labels": labels, "index": index}


@torch.no_grad()
def check_packing(model: torch.nn.Module, loader: Any, device: torch.device, rows: int = 4) -> None:
    """Refuse (ConfigError) a model that does not keep attention within packed rows: the loss of
    ``rows`` training rows packed into one sequence must equal their loss one row at a time (each
    alone: no padding, no mask), to a relative 1e-4.  Run once before training, in eval mode; the
    model's ``use_cache`` is turned off (packed-row detection needs it off)."""
    from .config_yaml import ConfigError

    model.config.use_cache = False  # type: ignore[union-attr]
    items = [loader.dataset[i] for i in range(min(rows, len(loader.dataset)))]
    packed = PackCollator(loader.collate_fn.pad, 10**9)(items)
    was_training = model.training
    model.eval()
    try:
        count = int((packed["labels"] != IGNORE_INDEX).sum())
        together = float(model(**{k: v.to(device) for k, v in packed.items() if k != "index"}).loss) * count
        alone = 0.0
        for item in items:
            labels = torch.as_tensor(item["labels"])[None].clone()
            labels[0, 0] = IGNORE_INDEX
            n = int((labels != IGNORE_INDEX).sum())
            if n:
                alone += float(model(input_ids=torch.as_tensor(item["input_ids"])[None].to(device),
                                     labels=labels.to(device)).loss) * n
    finally:
        model.train(was_training)
    if abs(together - alone) > 1e-4 * max(abs(alone), 1.0):
        raise ConfigError(f"train.packing: this model ({type(model).__name__}) lets packed rows attend to each other "
                          f"(the loss of {len(items)} rows packed is {together:.6f}, one at a time {alone:.6f}): its "
                          f"attention mask does not follow position_ids; set train.packing: false")
