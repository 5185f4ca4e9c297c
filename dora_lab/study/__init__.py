"""Optuna studies over run configs, tracked in MLflow: ``python -m dora_lab.study CONFIG``.

The runner (:mod:`.runner`) reads top to bottom; beside it the ``study:`` block without Optuna
(:mod:`.space`), its samplers and pruners (:mod:`.samplers`), one trial (:mod:`.trial`), grid
recovery (:mod:`.grid`) and the worker processes (:mod:`.workers`); MLflow tracking, pictures, tables
and store locks in :mod:`dora_lab.track`.

The runner's names are re-exported here lazily, so that reading a study's block
(``dora_lab.study.space``, as the reports do) imports neither the runner nor Optuna.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OptunaReporter", "StudySetup", "main", "optimize", "open_study", "prepare", "preflight", "run_study",
           "study_folder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
