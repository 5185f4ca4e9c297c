"""``python -m dora_lab.generate SOURCE --prompt TEXT [--merged]``: text from a causal-LM adapter.

The entry point only: the command is :mod:`dora_lab.export.generate`.
"""

from .export.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
