"""Evaluation: predictions in the loader's order, put back in the data's order, then metrics.

Three kinds of task (:class:`~dora_lab.run.tasks.TaskSpec`): a classifier's logits go to
:func:`~dora_lab.run.tasks.compute_metrics`; a GLUE task asked as a prompt scores each label by
the total log-likelihood of its verbaliser's tokens after the prompt
(:func:`label_log_likelihoods`), and those scores, as logits, go to the same metrics (argmax: the
predicted label); instruction data gives the mean NLL over every response token of the split
(token-weighted) and its exponential, the perplexity (:func:`response_nll`), and with a
:class:`GenerationEval` (``eval.generate``) the score of the answers the model generates
(:func:`dora_lab.run.generation.generation_metrics`) beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.labels import IGNORE_INDEX
from .config_eval import EvalConfig
from .config_yaml import ConfigError
from .generation import Sampling, generation_metrics
from .tasks import TaskSpec, compute_metrics, language_model_metrics

__all__ = ["GenerationEval", "answer_log_likelihoods", "eval_autocast", "evaluate", "generation_eval", "initial_evaluation",
           "label_log_likelihoods", "predict", "response_nll"]


@dataclass(frozen=True)
class GenerationEval:
    """Generation-based scoring of instruction data (the ``eval:`` block): the tokenizer that decodes
    answers, the comparison rule, the decoding settings, the rows answered, prompts per batch."""

    tokenizer: Any
    rule: str
    sampling: Sampling
    rows: int | None = None
    batch_size: int = 16


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device, autocast: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every example, in the data's original order."""
    model.eval()
    logits, labels, order = [], [], []
    for batch in loader:
        index = batch["index"]
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("index", "labels")}
        with autocast:
            out = model(**inputs).logits
        logits.append(out.float().cpu())
        labels.append(batch["labels"])
        order.append(index)
    idx = torch.cat(order).argsort()
    return torch.cat(logits)[idx].numpy(), torch.cat(labels)[idx].numpy()


def answer_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens and how many there are.

    ``logits`` ``(B, T, V)`` from a causal LM, ``labels`` ``(B, T)`` with ``-100`` where no token is
    scored; the token at position ``t`` is predicted by the logits at ``t - 1`` (the shift a
    causal LM's loss makes).  Only the labelled positions go through the log-softmax (in float32
    at least).
    """
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    picked = logits[:, :-1][rows, cols]
    picked = torch.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), dim=-1)
    token_lp = picked.gather(1, targets[rows, cols].unsqueeze(1)).squeeze(1)
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, rows, token_lp.double())
    return sums, (targets != IGNORE_INDEX).sum(dim=1)


def _batches(model: nn.Module, loader: Any, device: torch.device,
             autocast: Any) -> Any:
    model.eval()
    for batch in loader:
        labels = batch["labels"].to(device)
        with autocast:
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        yield batch, answer_log_likelihoods(logits, labels)


@torch.no_grad()
def response_nll(model: nn.Module, loader: Any, device: torch.device, autocast: Any) -> tuple[float, int]:
    """Instruction data: the summed NLL over every response token of ``loader`` and their count."""
    total, tokens = 0.0, 0
    for _, (sums, counts) in _batches(model, loader, device, autocast):
        total -= float(sums.sum())
        tokens += int(counts.sum())
    return total, tokens


@torch.no_grad()
def label_log_likelihoods(model: nn.Module, loader: Any, device: torch.device,
                          autocast: Any) -> tuple[np.ndarray, np.ndarray]:
    """A prompt task: ``(scores, gold)``, ``scores[i, j]`` the total log-likelihood of label ``j``'s
    verbaliser after example ``i``'s prompt (examples in the data's order), ``gold[i]`` its label.
    ``loader`` is made with ``score_labels=True``: one row per example and label, or, when every
    verbaliser is one token (``label_tokens``), one row per example whose answer position's
    log-softmax holds every label's score."""
    encoding = loader.dataset.causal
    examples = sorted(encoding.gold)
    position = {e: i for i, e in enumerate(examples)}
    tokens = encoding.label_tokens
    n_labels = len(tokens) if tokens is not None else max(encoding.choice) + 1
    scores = np.full((len(examples), n_labels), np.nan)
    if tokens is not None:
        model.eval()
        for batch in loader:
            with autocast:
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            rows, cols = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # one answer token a row
            at = logits[:, :-1][rows.to(device), cols.to(device)]
            lp = torch.log_softmax(at.to(torch.promote_types(at.dtype, torch.float32)), dim=-1)[:, tokens]
            scores[[position[e] for e in batch["example"][rows].tolist()]] = lp.double().cpu().numpy()
    else:
        for batch, (sums, _) in _batches(model, loader, device, autocast):
            for e, c, value in zip(batch["example"].tolist(), batch["choice"].tolist(), sums.tolist(), strict=True):
                scores[position[e], c] = value
    if np.isnan(scores).any():
        raise ValueError("the loader did not score every label of every example (make it with score_labels=True)")
    return scores, np.array([encoding.gold[e] for e in examples])


def eval_autocast(config: EvalConfig, device: torch.device, train_autocast: Any) -> Any:
    """The autocast context evaluation runs under (``eval.autocast``): bf16 for ``bf16``, and for ``auto``
    on a CUDA device with bf16; else ``train_autocast``, the training step's (``model.precision``).
    Evaluation keeps no activations for a backward pass, so a GPU's bf16 only makes it faster; on a
    CPU ``auto`` stays off (not measured to pay there)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.autocast == "bf16" or (config.autocast == "auto" and cuda_bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return train_autocast


def generation_eval(config: EvalConfig, spec: TaskSpec, tokenizer: Any = None, seed: int = 0,
                    batch_size: int = 16) -> GenerationEval | None:
    """The ``eval:`` block's generation scoring for ``spec`` (None when ``eval.generate`` is off);
    ConfigError when it is on for a task that is not instruction data (no reference answers)."""
    if not config.generate:
        return None
    if not spec.is_instruction:
        raise ConfigError(f"eval.generate scores generated answers of instruction data (prompt/response rows), "
                          f"but task {spec.name!r} is not instruction data; set eval.generate: false")
    return GenerationEval(tokenizer, config.answer, config.sampling(seed), config.rows, batch_size)


def evaluate(
    model: nn.Module, loaders: Mapping[str, Any], spec: TaskSpec, device: torch.device, autocast: Any,
    generation: GenerationEval | None = None,
) -> dict[str, float]:
    """Metrics on every evaluation split: plain keys for the first, ``split/key`` for the others
    (with ``generation``, instruction data also gets ``gen_accuracy`` and ``gen_tokens``)."""
    out: dict[str, float] = {}
    for i, (split, loader) in enumerate(loaders.items()):
        if spec.is_instruction:
            metrics = language_model_metrics(*response_nll(model, loader, device, autocast))
            if generation is not None:
                with autocast:
                    metrics.update(generation_metrics(
                        model, generation.tokenizer, loader.dataset.causal, rule=generation.rule,
                        sampling=generation.sampling, rows=generation.rows, batch_size=generation.batch_size))
        elif spec.is_causal:
            metrics = compute_metrics(spec, *label_log_likelihoods(model, loader, device, autocast))
        else:
            metrics = compute_metrics(spec, *predict(model, loader, device, autocast))
        for key, value in metrics.items():
            out[key if i == 0 else f"{split}/{key}"] = float(value)
    return out


def initial_evaluation(model: nn.Module, *args: Any) -> dict[str, float]:
    """``eval.at_start``: :func:`evaluate` before the first step, in a forked RNG (a data loader draws
    its seed from the global stream), so the run trains exactly as it would without it."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        return evaluate(model, *args)
