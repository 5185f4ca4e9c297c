"""``python -m dora_lab.train CONFIG [--set key=value ...]``: one training run.

The entry point only: the run itself is :mod:`dora_lab.run.train`.
"""

from .run.train import main

if __name__ == "__main__":
    raise SystemExit(main())
