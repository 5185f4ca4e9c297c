"""Optuna studies over run configs, tracked in MLflow: ``python -m dora_lab.study CONFIG``.

The runner (:mod:`.runner`) reads top to bottom; beside it the samplers and pruners
(:mod:`.samplers`), one trial (:mod:`.trial`), grid recovery (:mod:`.grid`) and the worker processes
(:mod:`.workers`).  The ``study:`` block without Optuna, read alike by the reports, is
:mod:`dora_lab.plan` (import its names from there); MLflow tracking, pictures,
tables and store locks are :mod:`dora_lab.track`.  The command ``python -m dora_lab.study`` is
:mod:`dora_lab.studies`: this runner with the report wired in (the runner does not import the report).

The package's front names are imported here lazily, each from its one home, so that
``import dora_lab.study`` imports neither the runner nor Optuna.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each name of this package's front -> the module that defines it.
_HOMES = {
    "OptunaReporter": "dora_lab.study.trial",
    "preflight": "dora_lab.study.trial",
    "StudySetup": "dora_lab.plan.setup",
    "prepare": "dora_lab.plan.setup",
    **{name: "dora_lab.study.runner" for name in ("main", "optimize", "open_study", "run_study", "study_folder")},
}

__all__ = ["OptunaReporter", "StudySetup", "main", "optimize", "open_study", "prepare", "preflight", "run_study",
           "study_folder"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
