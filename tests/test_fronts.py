"""The packages' fronts: every name a package's ``__init__`` lists in ``__all__`` imports, and is the
very object its home defines (a front passes names on; it never holds a copy).

tests/test_structure.py reads the source and allows a second import path nowhere but in a package's
``__init__``; this imports the fronts for real, the lazy one of :mod:`dora_lab.study` included (its
names come from their homes, :mod:`dora_lab.study.trial`, :mod:`dora_lab.plan.setup` and
:mod:`dora_lab.study.runner`, without importing any of them before they are asked for).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (setup.py), as tests/test_structure.py reads them
ROOTS = {"dora_lab": "dora_lab", "methods": "dora_lab.methods", "metrics": "dora_lab.metrics"}


def fronts() -> list[str]:
    """Every package of the tree (a folder with an ``__init__.py``), by installed name."""
    found = []
    for folder, package in ROOTS.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            found.append(".".join([package, *init.parent.relative_to(REPO / folder).parts]))
    return found


@pytest.mark.parametrize("package", fronts())
def test_every_front_name_is_its_homes_object(package: str) -> None:
    front = importlib.import_module(package)
    for name in getattr(front, "__all__", []):
        value = getattr(front, name)  # an AttributeError here: the front lists a name it does not have
        home = getattr(value, "__module__", None)  # a class's or a function's; a constant has none
        if home is not None and home.startswith("dora_lab"):
            defined = getattr(value, "__name__", name)
            assert getattr(importlib.import_module(home), defined, None) is value, (
                f"{package}.{name} is not {home}.{defined}")


def test_the_study_front_gives_each_name_from_its_home_lazily() -> None:
    code = ("import sys, dora_lab.study as s\n"
            "lazy = [m for m in ('optuna', 'dora_lab.study.runner', 'dora_lab.plan.setup') if m in sys.modules]\n"
            "from dora_lab.plan.setup import StudySetup, prepare\n"
            "from dora_lab.study.runner import main\n"
            "from dora_lab.study.trial import OptunaReporter, preflight\n"
            "assert (s.prepare, s.StudySetup, s.preflight, s.OptunaReporter, s.main) == "
            "(prepare, StudySetup, preflight, OptunaReporter, main)\n"
            "print(lazy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import dora_lab.study imported {proc.stdout.strip()}"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        importlib.import_module("dora_lab.study").nothing  # noqa: B018
