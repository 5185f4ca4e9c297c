"""``python -m dora_lab.lm_eval SOURCE --tasks T[,T...]``: lm-evaluation-harness on a trained adapter.

The entry point only: the command is :mod:`dora_lab.export.harness`.
"""

from .export.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
