"""lm-evaluation-harness on a trained adapter: ``python -m dora_lab.lm_eval SOURCE --tasks T[,T...]``.

    python -m dora_lab.lm_eval SOURCE --tasks hellaswag,arc_easy [--merged] [--include-path DIR]
        [--num-fewshot K] [--limit N] [--batch-size 8] [--output FILE] [--base PATH] [--device cpu]

SOURCE is what ``python -m dora_lab.generate`` takes (an adapter folder, a run folder holding
``adapter/``, or an MLflow run id).  The adapted model (or with ``--merged`` the adapter folded into
the base weights) is handed to lm-eval as a model object, ``lm_eval.models.huggingface.HFLM(
pretrained=model, tokenizer=tokenizer)``, and scored by ``lm_eval.simple_evaluate``: the task's
own rules (prompts, loglikelihoods, metrics) are lm-eval's, not re-implemented here.

``--include-path DIR`` adds the task YAMLs in DIR, e.g. a local task that reads a JSONL file
(``dataset_path: json``, ``dataset_kwargs: {data_files: {test: rows.jsonl}}``), the way to
evaluate offline; lm-eval's own tasks download their data from the Hub.  Task names are checked
before the model is loaded.  The results table is printed; ``--output`` also writes lm-eval's
``results`` (and the source, tasks and ``merged``) as JSON.  Bad input exits with status 2.

lm-eval is an optional extra (``pip install 'dora_lab[eval]'``); without it the command says so.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..core.checkpoint import AdapterError
from ..run.cli import refuse
from .cli import ExportError
from .generate import load_causal

__all__ = ["evaluate", "main", "task_manager"]


def task_manager(include_path: str | None, tasks: Sequence[str]) -> Any:
    """lm-eval's ``TaskManager`` (with the YAMLs of ``include_path``), after checking that each of
    ``tasks`` is one it knows; raises :class:`ExportError` naming the fix otherwise."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ExportError(f"lm-eval is not installed ({e}); install it with pip install 'dora_lab[eval]' "
                          f"(or pip install lm-eval)") from e
    if include_path is not None and not Path(include_path).is_dir():
        raise ExportError(f"--include-path {include_path!r} is not a folder; give the folder holding the task "
                          f"YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else " (add your own task YAMLs with --include-path DIR)"
        raise ExportError(f"--tasks: {', '.join(map(repr, unknown))} is not an lm-eval task known to lm-eval"
                          f"{where}; list them with: lm-eval ls tasks")
    return manager


def evaluate(model: nn.Module, tokenizer: Any, tasks: Sequence[str], *, manager: Any = None,
             num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` (in eval mode) on ``tasks``: lm-eval's whole result dict
    (``results[task]["acc,none"]``...), the per-sample records under ``samples``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                          limit=limit, log_samples=True)
    if out is None:  # lm-eval returns None on the non-zero ranks of a distributed run only
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return dict(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dora_lab.lm_eval",
                                description="Evaluate a saved causal-LM adapter with lm-evaluation-harness.")
    p.add_argument("source", metavar="SOURCE", help="adapter folder, training-run folder (with adapter/), or MLflow run id")
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAMLs (local tasks, offline)")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base weights first")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--base", default=None, help="base model to load instead of the one saved with the adapter")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ExportError("--tasks is empty; give one or more lm-eval task names, comma-separated")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--num-fewshot", args.num_fewshot)):
        if value is not None and value < (0 if flag == "--num-fewshot" else 1):
            raise ExportError(f"{flag} must be {'0 or more' if flag == '--num-fewshot' else 'at least 1'}, got {value}")
    if args.output is not None and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise ExportError(f"--output {args.output!r}: its folder does not exist; create it or write elsewhere")
    return tasks


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tasks = _check(args)
        manager = task_manager(args.include_path, tasks)
        model, tokenizer = load_causal(args.source, base=args.base, tracking_uri=args.tracking_uri,
                                       merged=args.merged, device=args.device,
                                       what="lm-eval scores language models (evaluate it with its own task)")
    except (ExportError, AdapterError) as e:
        return refuse(e)
    out = evaluate(model, tokenizer, tasks, manager=manager, num_fewshot=args.num_fewshot, limit=args.limit,
                   batch_size=args.batch_size)
    from lm_eval.utils import make_table

    print(make_table(out))
    if args.output is not None:
        record = {"source": args.source, "merged": args.merged, "tasks": tasks, "results": out["results"]}
        Path(args.output).expanduser().write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0
