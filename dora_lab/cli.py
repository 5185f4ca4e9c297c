"""``dora-lab TOOL [ARGS ...]`` (or ``python -m dora_lab TOOL``): the installed command, one name for the five tools.

``dora-lab train|study|report|export|generate ARGS`` runs exactly what
``python -m dora_lab.train|study|report|export|generate ARGS`` runs (the same ``main``, the same exit
codes: 0 done, 1 failed during the work, 2 bad input, 130 Ctrl-C; see :mod:`dora_lab.run.cli`).
Each tool is imported only when named, so ``dora-lab report`` does not load the training stack's
optional parts it does not need.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["TOOLS", "main"]

#: tool name -> (module holding its ``main``, one line of what it does)
TOOLS: dict[str, tuple[str, str]] = {
    "train": ("dora_lab.run.train", "one training run from a config (python -m dora_lab.train)"),
    "study": ("dora_lab.studies", "an Optuna study, every trial logged to MLflow (python -m dora_lab.study)"),
    "report": ("dora_lab.report.compare", "an ablation report over finished studies (python -m dora_lab.report)"),
    "export": ("dora_lab.export.cli", "an adapter out: merged model or PEFT LoRA (python -m dora_lab.export)"),
    "generate": ("dora_lab.export.generate", "text from a causal-LM adapter (python -m dora_lab.generate)"),
}

EXIT_INPUT = 2  # dora_lab.run.cli.EXIT_INPUT, not imported: this module must stay light


def usage() -> str:
    """The help text: every tool and what it does."""
    width = max(map(len, TOOLS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in TOOLS.items()]
    return ("usage: dora-lab TOOL [ARGS ...]   (dora-lab TOOL --help for a tool's arguments)\n\ntools:\n"
            + "\n".join(lines))


def tool_main(name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main`` of the tool ``name`` (a key of :data:`TOOLS`), imported now."""
    module = importlib.import_module(TOOLS[name][0])
    return module.main  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dora-lab TOOL ARGS``; returns the tool's exit code (2 for an unknown or missing tool)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not args or args[0] not in TOOLS:
        what = f"unknown tool {args[0]!r}" if args else "no tool named"
        print(f"error: {what}: the first argument of dora-lab is one of {', '.join(TOOLS)} "
              f"(for example `dora-lab train configs/cola.yaml`).\n\n{usage()}", file=sys.stderr)
        return EXIT_INPUT
    return tool_main(args[0])(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
