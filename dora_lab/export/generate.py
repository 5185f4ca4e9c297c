"""Text from a trained causal-LM adapter, with or without merging it into the base weights.

    python -m dora_lab.generate SOURCE --prompt "Is this sentence grammatical? ..." [--merged]
        [--max-new-tokens 64] [--system TEXT] [--raw] [--base PATH]

SOURCE is what ``python -m dora_lab.export`` takes (an adapter folder, a run folder holding
``adapter/``, or an MLflow run id).  The base model and its tokenizer are loaded from the name saved
with the adapter (or ``--base``), resolved as training resolves ``model.name`` (offline, the known
local copies such as SmolLM2's converted GGUF stand in for their Hub ids).  The prompt is wrapped in
the tokenizer's chat template when it has one (a user turn, after ``--system`` if given, then the
assistant's turn opened); ``--raw`` feeds it as plain text.  Decoding is greedy, so the adapted and
the ``--merged`` model (adapter folded into the weights: the base model's cost per token) give the
same tokens.  Bad input exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run.cli import refuse
from ..run.models import resolve_model_path
from .checkpoint import AdapterError, load_adapter, read_adapter_config
from .cli import ExportError, resolve_source

__all__ = ["generate_text", "main", "prompt_ids"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


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


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
                  system: str | None = None, raw: bool = False) -> tuple[str, list[int]]:
    """Greedy continuation of ``prompt``: ``(decoded text, new token ids)``; ``model`` is put in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, system=system, raw=raw).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),  # type: ignore[operator]
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = [int(t) for t in out[0, ids.shape[1]:]]
    return tokenizer.decode(new, skip_special_tokens=True), new


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dora_lab.generate",
                                description="Generate text from a saved causal-LM adapter (greedy).")
    p.add_argument("source", metavar="SOURCE", help="adapter folder, training-run folder (with adapter/), or MLflow run id")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--system", default=None, help="a system message before it (chat template only)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base weights first")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--base", default=None, help="base model to load instead of the one saved with the adapter")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ExportError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        with tempfile.TemporaryDirectory(prefix="dora_lab_generate_") as tmp:
            folder = resolve_source(args.source, args.tracking_uri, Path(tmp))
            config = read_adapter_config(folder)
            cls = str(config["base_model"].get("model_class") or "")
            if not cls.endswith(_CAUSAL_SUFFIXES):
                raise ExportError(f"{folder} is an adapter for a {cls or 'model of unknown class'}, not a causal "
                                  f"language model: there is no text to generate (evaluate it instead)")
            base = args.base or str(config["base_model"]["name_or_path"])
            path, local_only = resolve_model_path(base)
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            except (OSError, ValueError) as e:
                raise ExportError(f"no tokenizer for the base {base!r} ({e}); pass --base with a folder that has one") from e
            model = load_adapter(folder, base_model=path)
        if args.merged:
            from .merge import merged_model

            model = merged_model(model, inplace=True)
        model.to(torch.device(args.device))
    except (ExportError, AdapterError) as e:
        return refuse(e)
    text, new = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                              system=args.system, raw=args.raw)
    print(f"{'merged' if args.merged else 'adapted'} model, {len(new)} new tokens:", file=sys.stderr)
    print(text)
    return 0
