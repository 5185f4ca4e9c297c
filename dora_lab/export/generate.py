"""Text from a trained causal-LM adapter, with or without merging it into the base weights.

    python -m dora_lab.generate SOURCE --prompt "Is this sentence grammatical? ..." [--prompt ...]
        [--prompts-file FILE] [--merged] [--max-new-tokens 64] [--temperature 0] [--top-p 1]
        [--seed 0] [--batch-size 8] [--system TEXT] [--raw] [--base PATH]

SOURCE is what ``python -m dora_lab.export`` takes (an adapter folder, a run folder holding
``adapter/``, or an MLflow run id).  The base model and its tokenizer are loaded from the name saved
with the adapter (or ``--base``), resolved as training resolves ``model.name`` (offline, the known
local copies such as SmolLM2's converted GGUF stand in for their Hub ids).  Each prompt is wrapped in
the tokenizer's chat template when it has one (a user turn, after ``--system`` if given, then the
assistant's turn opened); ``--raw`` feeds it as plain text.  Prompts (``--prompt`` repeated, and the
lines of ``--prompts-file``) are answered ``--batch-size`` at a time, left-padded, each getting the
tokens it gets alone (:func:`dora_lab.run.generation.generate_ids`).  ``--temperature 0`` (the
default) decodes greedily, so the adapted and the ``--merged`` model (adapter folded into the
weights: the base model's cost per token) give the same tokens; a temperature above 0 samples,
with ``--top-p`` and ``--seed``.  One prompt prints its answer; several print one JSON line each
(``{"prompt": ..., "answer": ...}``).  Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import AdapterError, read_adapter_config
from ..run.cli import refuse
from ..run.generation import Sampling, generate_ids, stop_ids
from ..run.models import resolve_model_path
from .checkpoint import load_adapter
from .cli import ExportError, resolve_source

__all__ = ["generate_text", "generate_texts", "load_causal", "main", "prompt_ids"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_GREEDY = Sampling(max_new_tokens=64)


def prompt_ids(tokenizer: Any, prompt: str, *, system: str | None = None, raw: bool = False) -> torch.Tensor:
    """The prompt's token ids (``1 x n``): through the chat template when the tokenizer has one and
    ``raw`` is False (with the assistant's turn opened), else the plain text."""
    if not raw and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids).reshape(1, -1)


def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, sampling: Sampling = _GREEDY,
                   system: str | None = None, raw: bool = False, batch_size: int = 8) -> list[tuple[str, list[int]]]:
    """Each prompt's continuation, ``(decoded text, new token ids)``, batched; ``model`` is put in eval mode."""
    ids = [prompt_ids(tokenizer, p, system=system, raw=raw)[0].tolist() for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new = generate_ids(model, ids, stop=stop_ids(model, tokenizer), pad=pad, sampling=sampling,
                       batch_size=batch_size)
    return [(tokenizer.decode(n, skip_special_tokens=True), n) for n in new]


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
                  system: str | None = None, raw: bool = False) -> tuple[str, list[int]]:
    """Greedy continuation of one ``prompt``: ``(decoded text, new token ids)``."""
    return generate_texts(model, tokenizer, [prompt], sampling=Sampling(max_new_tokens), system=system, raw=raw)[0]


def load_causal(source: str, *, base: str | None = None, tracking_uri: str | None = None, merged: bool = False,
                device: str = "cpu", what: str = "there is no text to generate (evaluate it instead)") -> tuple[nn.Module, Any]:
    """The adapted causal LM of ``source`` (an adapter folder, a run folder, an MLflow run id) and
    its base's tokenizer; ``merged`` folds the adapter into the weights.  ``what`` ends the refusal
    of an adapter that is not a causal LM's.  Raises :class:`ExportError` / :class:`AdapterError`."""
    with tempfile.TemporaryDirectory(prefix="dora_lab_generate_") as tmp:
        folder = resolve_source(source, tracking_uri, Path(tmp))
        config = read_adapter_config(folder)
        cls = str(config["base_model"].get("model_class") or "")
        if not cls.endswith(_CAUSAL_SUFFIXES):
            raise ExportError(f"{folder} is an adapter for a {cls or 'model of unknown class'}, not a causal "
                              f"language model: {what}")
        base = base or str(config["base_model"]["name_or_path"])
        path, local_only = resolve_model_path(base)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise ExportError(f"no tokenizer for the base {base!r} ({e}); pass --base with a folder that has one") from e
        model = load_adapter(folder, base_model=path)
    if merged:
        from .merge import merged_model

        model = merged_model(model, inplace=True)
    return model.to(torch.device(device)), tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dora_lab.generate",
                                description="Generate text from a saved causal-LM adapter.")
    p.add_argument("source", metavar="SOURCE", help="adapter folder, training-run folder (with adapter/), or MLflow run id")
    p.add_argument("--prompt", action="append", default=[], help="the user's message (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="a text file of prompts, one a line (blank lines skipped)")
    p.add_argument("--system", default=None, help="a system message before it (chat template only)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base weights first")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: the nucleus mass kept (0 < p <= 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling: the random seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (left-padded)")
    p.add_argument("--base", default=None, help="base model to load instead of the one saved with the adapter")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"--prompts-file: cannot read {args.prompts_file} ({e}); give a UTF-8 text file") from e
    if not prompts:
        raise ExportError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _sampling(args: argparse.Namespace) -> Sampling:
    for flag, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1),
                            ("--batch-size", args.batch_size, args.batch_size >= 1)):
        if not ok:
            rule = {"--temperature": "0 or more", "--top-p": "above 0 and at most 1"}.get(flag, "at least 1")
            raise ExportError(f"{flag} must be {rule}, got {value}")
    return Sampling(args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                    top_p=args.top_p, seed=args.seed)


def _print(prompts: Sequence[str], answers: Sequence[tuple[str, list[int]]], merged: bool) -> None:
    tokens = ", ".join(str(len(n)) for _, n in answers)
    print(f"{'merged' if merged else 'adapted'} model, new tokens: {tokens}", file=sys.stderr)
    if len(prompts) == 1:
        print(answers[0][0])
        return
    for prompt, (text, _) in zip(prompts, answers, strict=True):
        print(json.dumps({"prompt": prompt, "answer": text}, ensure_ascii=False))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        prompts, sampling = _prompts(args), _sampling(args)
        model, tokenizer = load_causal(args.source, base=args.base, tracking_uri=args.tracking_uri,
                                       merged=args.merged, device=args.device)
    except (ExportError, AdapterError) as e:
        return refuse(e)
    answers = generate_texts(model, tokenizer, prompts, sampling=sampling, system=args.system, raw=args.raw,
                             batch_size=args.batch_size)
    _print(prompts, answers, args.merged)
    return 0
