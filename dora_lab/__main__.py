"""``python -m dora_lab TOOL [ARGS ...]``: the same as the installed ``dora-lab`` command
(:mod:`dora_lab.cli`)."""

from .cli import main

raise SystemExit(main())
