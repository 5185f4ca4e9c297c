"""Text generation from a causal LM, batched, and generation-based scoring of its answers.

:func:`generate_ids` continues many prompts at once: they are padded on the *left* (every prompt
ends where the new tokens start) with an attention mask, so a batch gives each prompt the tokens it
gets alone (greedy; checked in tests/test_generation.py).  :class:`Sampling` holds the decoding
settings: greedy by default, or sampled with ``temperature`` and ``top_p`` (nucleus; no top-k
cut) from a fixed ``seed``, drawn inside a forked RNG so that generating never moves a training
run's random stream.  A continuation ends at its first stop token (the model's generation eos
tokens and the tokenizer's eos), which is dropped.

Scoring (:func:`answer_score`) compares a generated answer with the reference answer:

- ``exact``: equal after collapsing whitespace (runs of spaces and newlines become one space,
  the ends stripped);
- ``last_number``: the last number in each (``-3``, ``1,024``, ``2.50``) is the same value; an
  answer without a number is wrong.  This is the usual reading of arithmetic answers ("3 + 82 = 85"
  answers "85").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.labels import IGNORE_INDEX
from .causal import CausalEncoding

__all__ = ["ANSWER_RULES", "Sampling", "answer_score", "generate_ids", "generation_metrics", "last_number",
           "split_prompt_answer", "stop_ids"]

#: How a generated answer is compared with the reference (``eval.answer``).
ANSWER_RULES = ("exact", "last_number")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy unless ``do_sample`` (then ``temperature`` and ``top_p``, seeded)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        """What ``model.generate`` takes for these settings (top-k off: only ``top_p`` cuts)."""
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, "temperature": None,
                    "top_p": None, "top_k": None}
        return {"do_sample": True, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": 0}


def stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the model's generation eos ids and the tokenizer's eos."""
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    for value in [*(eos if isinstance(eos, list) else [eos]), getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(value, int) and value not in found:
            found.append(value)
    return found


def _left_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p))
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, stop: Sequence[int], pad: int,
                 sampling: Sampling = Sampling(), batch_size: int = 16) -> list[list[int]]:
    """The new tokens after each prompt (token id lists), up to its first stop token (dropped),
    ``batch_size`` prompts a ``generate`` call, left-padded.  ``model`` is put in eval mode."""
    if any(not p for p in prompts):
        raise ValueError("cannot generate after an empty prompt")
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling.seed)
        for start in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[start:start + batch_size], pad, device)
            new = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,  # type: ignore[operator]
                                 eos_token_id=list(stop) or None, **sampling.generate_kwargs())[:, ids.shape[1]:]
            for row in new.tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                out.append(row[:cut])
    return out


def last_number(text: str) -> float | None:
    """The value of the last number in ``text`` (thousands commas allowed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def answer_score(answer: str, reference: str, rule: str) -> bool:
    """Whether ``answer`` matches ``reference`` under ``rule`` (:data:`ANSWER_RULES`)."""
    if rule == "exact":
        return " ".join(answer.split()) == " ".join(reference.split())
    if rule == "last_number":
        mine, gold = last_number(answer), last_number(reference)
        return mine is not None and gold is not None and mine == gold
    raise ValueError(f"eval.answer must be one of {', '.join(ANSWER_RULES)}, got {rule!r}")


def split_prompt_answer(encoding: CausalEncoding, rows: int | None = None) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids)`` of an instruction encoding's first ``rows`` rows: the last run of
    labelled tokens is the reference answer (a response, or a chat row's last assistant turn) and
    every token before it the prompt (earlier assistant turns included)."""
    out = []
    for ids, labels in list(zip(encoding.input_ids, encoding.labels, strict=True))[:rows]:
        end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        out.append((list(ids[:start]), list(labels[start:end])))
    return out


def generation_metrics(model: nn.Module, tokenizer: Any, encoding: CausalEncoding, *, rule: str,
                       sampling: Sampling, rows: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """``gen_accuracy``: the share of the first ``rows`` rows whose generated answer matches the
    reference (:func:`answer_score` under ``rule``), and ``gen_tokens``: the mean answer length."""
    pairs = split_prompt_answer(encoding, rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new = generate_ids(model, [p for p, _ in pairs], stop=stop_ids(model, tokenizer), pad=pad, sampling=sampling,
                       batch_size=batch_size)
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    references = tokenizer.batch_decode([a for _, a in pairs], skip_special_tokens=True)
    right = sum(answer_score(a, r, rule) for a, r in zip(answers, references, strict=True))
    return {"gen_accuracy": right / len(pairs), "gen_tokens": sum(map(len, new)) / len(pairs)}
