"""One home per default (issue 26): the defaults that used to be written two or three times are named
constants in one module, and no other place writes their literal again.

Read from the source with :mod:`ast` (nothing is imported): a default is a function parameter's
default, a class attribute's value or its pydantic ``Field(...)`` default, under the key's name.  A
literal that reappears there (``warmup: float = 0.15`` in a new function) fails the test, which
names the file and line; the fix is to read the constant.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from dora_lab.core.methods import DEFAULT_METHOD
from dora_lab.core.schedules import DEFAULT_FINAL, DEFAULT_INTERVAL, DEFAULT_WARMUP
from dora_lab.run.config import DEFAULT_MAX_LENGTH, RunConfig

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("dora_lab", "methods", "metrics")

#: key -> (the default's literal, its one home: the constant's module and name)
HOMES = {
    "warmup": (0.15, "dora_lab/core/schedules.py", "DEFAULT_WARMUP"),
    "final": (0.5, "dora_lab/core/schedules.py", "DEFAULT_FINAL"),
    "interval": (100, "dora_lab/core/schedules.py", "DEFAULT_INTERVAL"),
    "max_length": (128, "dora_lab/run/config.py", "DEFAULT_MAX_LENGTH"),
    "init": ("dora", "dora_lab/core/adapter/layer.py", "DEFAULT_INIT"),
}
#: the allocation method's default: a parameter or attribute ``name``/``method`` of these scopes
METHOD_SCOPES = ("make_method", "MethodConfig", "PruningController")


def _literal(node: ast.expr | None) -> object:
    """The literal a default is written as: a constant, or ``Field(constant, ...)`` / ``Field(default=...)``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Field":
        first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "default"), None)
        return _literal(first)
    return None


def written_defaults(tree: ast.AST, scope: str = "") -> Iterator[tuple[str, str, object, int]]:
    """Every default written as a literal: (enclosing class or function, key, literal, line)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults, strict=True),
                     *((arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None)]
            for arg, default in pairs:
                yield node.name, arg.arg, _literal(default), default.lineno
            yield from written_defaults(node, node.name)
        elif isinstance(node, ast.ClassDef):
            yield from written_defaults(node, node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield scope, node.target.id, _literal(node.value), node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_method" and node.args:
            yield "make_method", "name", _literal(node.args[0]), node.lineno
        else:
            yield from written_defaults(node, scope)


def offenders(tree: ast.AST) -> list[tuple[str, int]]:
    """The keys whose default literal is written in ``tree`` instead of read from its home."""
    found = []
    for scope, key, value, line in written_defaults(tree):
        if key in HOMES and value == HOMES[key][0] and type(value) is type(HOMES[key][0]):
            found.append((key, line))
        elif key in ("name", "method") and scope in METHOD_SCOPES and value == DEFAULT_METHOD:
            found.append(("method", line))
    return found


def constants(tree: ast.Module) -> dict[str, object]:
    plain = {t.id: _literal(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    typed = {node.target.id: _literal(node.value) for node in tree.body
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    return {**plain, **typed}


# -- the reader, on hand-made cases ----------------------------------------------------------------
def test_the_reader_finds_a_literal_default_wherever_it_is_written() -> None:
    source = (
        "class ScheduleConfig:\n"
        "    warmup: float = Field(0.15, ge=0)\n"  # a pydantic default
        "    final: float = Field(default=0.5)\n"
        "def build(total, *, interval=100, max_length: int = 128, warmup=DEFAULT_WARMUP):\n"  # read: not an offender
        "    return make_method('dora')\n"
        "class MethodConfig:\n"
        "    name: str = Field('dora')\n"
        "class ScheduleOnly:\n"
        "    name: str = Field('dora')\n"  # the schedule named dora: another key
        "    warmup_ratio: float = 0.15\n"  # another key
    )
    assert sorted(offenders(ast.parse(source))) == [
        ("final", 3), ("interval", 4), ("max_length", 4), ("method", 5), ("method", 7), ("warmup", 2)]


# -- the package ---------------------------------------------------------------------------------
def test_each_merged_default_has_one_home_and_is_written_nowhere_else() -> None:
    found = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            found += [f"{path.relative_to(REPO).as_posix()}:{line} ({key})"
                      for key, line in offenders(ast.parse(path.read_text()))]
    assert not found, ("a default written again instead of read from its one home (core/schedules.py's "
                       f"DEFAULT_WARMUP/FINAL/INTERVAL, core/methods.py's DEFAULT_METHOD, run/config.py's "
                       f"DEFAULT_MAX_LENGTH, core/adapter/layer.py's DEFAULT_INIT): {found}")
    for key, (value, home, name) in HOMES.items():
        assert constants(ast.parse((REPO / home).read_text())).get(name) == value, (key, home, name)
    assert constants(ast.parse((REPO / "dora_lab/core/methods.py").read_text()))["DEFAULT_METHOD"] == "dora"


def test_the_config_and_the_controller_read_the_homes() -> None:
    import inspect

    from dora_lab.core.controller import PruningController
    from dora_lab.core.methods import make_method

    cfg = RunConfig()
    assert (cfg.schedule.warmup, cfg.schedule.final, cfg.schedule.interval) == (
        DEFAULT_WARMUP, DEFAULT_FINAL, DEFAULT_INTERVAL)
    assert (cfg.task.max_length, cfg.method.name) == (DEFAULT_MAX_LENGTH, DEFAULT_METHOD)
    params = inspect.signature(PruningController).parameters
    assert (params["warmup"].default, params["final"].default, params["interval"].default) == (
        DEFAULT_WARMUP, DEFAULT_FINAL, DEFAULT_INTERVAL)
    assert inspect.signature(make_method).parameters["name"].default == DEFAULT_METHOD
