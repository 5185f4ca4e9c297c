"""The package's shape: imports point down the layers, no import circle, no re-export shim, no module
over 400 lines and no function over 80 (docs/architecture.md).

Read from the source with :mod:`ast` (nothing is imported): every ``import`` and ``from ... import``
of every module of ``dora_lab/``, ``methods/`` and ``metrics/`` (the last two are installed as
``dora_lab.methods`` and ``dora_lab.metrics``), wherever it stands (lazy imports inside functions and
``if TYPE_CHECKING:`` imports are arrows too: they say which module depends on which).

Today's offenders are listed below by name, each with why, so the tests pass now and fail on any
NEW offender.  Issue 26 asks for them to be fixed; other work in flight is fixing them.  A listed
offender that no longer offends only warns: delete its line.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (setup.py)
ROOTS = {"dora_lab": "dora_lab", "methods": "dora_lab.methods", "metrics": "dora_lab.metrics"}

#: The layers, lowest first: a module may import its own subpackage and any lower layer, never a
#: higher one nor another subpackage of its own layer ("beside": study, report and export read what
#: runs wrote, not each other).  ``track`` is the home that MLflow logging, plots and tables are
#: moving to (used by study and report).  ``plan`` is what a study file says (the study: block's
#: schema, a study file read as the study CLI reads it, the objectives and their Pareto rule, the
#: report: block's schema): study runs it and report reads it, so it sits below both.  The top-level
#: modules (the ``dora_lab`` facade, the entry points train.py, generate.py, studies.py, cli.py) and every
#: package's ``__main__.py`` (what ``python -m`` runs) stand above everything.
LAYERS = {"core": 0, "methods": 1, "metrics": 1, "run": 2, "track": 3, "plan": 3, "study": 4, "report": 4,
          "export": 4}
TOP = 9

#: Arrows that break the layers, (importer, imported): none today (issue 26 removed the last), none may come.
ALLOWED_ARROWS: set[tuple[str, str]] = set()
#: Today's import circles, each as its set of modules: none (issue 26 ended the controller <-> methods
#: one: a method sees a MethodContext, core/context.py, never the controller), and none may come.
ALLOWED_CIRCLES: list[set[str]] = []

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
#: Modules over MAX_MODULE_LINES, by source path: none today, none may come.
ALLOWED_LONG_MODULES: set[str] = set()
#: Today's long functions, as path::qualified name.
ALLOWED_LONG_FUNCTIONS: set[str] = set()
#: Re-export shims (a module that only imports names to pass them on, so an old import path keeps
#: working), by installed name: none today (issue 26 follow-up deleted study/space.py,
#: study/objectives.py and report/block.py), none may come: import a name from its one home.
ALLOWED_SHIMS: set[str] = set()
#: Names a module (not a package's ``__init__``, the package's front) lists in ``__all__`` but imports
#: instead of defining: a second import path for a name that lives elsewhere.  As "module: name": none
#: today (the clean-up after issue 26 pointed every import at the name's home), none may come.
ALLOWED_RE_EXPORTS: set[str] = set()
#: Imports, anywhere in the repository's Python, of a package name from a module that is not its home
#: but only imports it too (a package's ``__init__``, its front, may be imported from).  As
#: "file: module.name": none today, none may come.
ALLOWED_SECOND_PATHS: set[str] = set()
#: The folders whose Python is read for such imports.
SCANNED = ("dora_lab", "methods", "metrics", "tests", "benchmarks", "scripts", "examples")


def source_modules() -> dict[str, Path]:
    """Every module's installed name -> its file."""
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = source_modules()


def imported(name: str) -> set[str]:
    """The package's modules that module ``name`` imports (relative imports resolved; ``from pkg
    import x`` is the module ``pkg.x`` when there is one, else ``pkg``)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = from_base(name, node)
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {known for t in targets if (known := nearest_module(t)) and known != name}


def from_base(name: str | None, node: ast.ImportFrom) -> str:
    """The module that ``from ... import`` reads in module ``name`` (its relative dots resolved; a file
    outside the package, ``name`` None, resolves to the dots alone, which name no module of the package)."""
    if not node.level:
        return node.module or ""
    if name is None:
        return "." * node.level + (node.module or "")
    here = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
    return ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".")


def nearest_module(target: str) -> str | None:
    """``target`` or its nearest enclosing package among the package's modules (None: outside)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {name: imported(name) for name in MODULES}


def layer(name: str) -> tuple[str, int]:
    """The subpackage a module belongs to and its layer; top-level modules, and a package's
    ``__main__`` (the script ``python -m`` runs, imported by nothing: an entry point), are above all layers."""
    parts = name.split(".")
    if parts[-1] == "__main__":
        return "", TOP
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1], LAYERS[parts[1]]
    assert MODULES[name].parent == REPO / "dora_lab", (
        f"{name}: in a new subpackage {parts[1]!r}; give it a layer in LAYERS (tests/test_structure.py)")
    return "", TOP


def wrong_way(importer: str, target: str) -> bool:
    (pkg, level), (target_pkg, target_level) = layer(importer), layer(target)
    return target_level > level or (target_level == level and target_pkg != pkg)


def circles() -> Iterator[set[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[set[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                yield from visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                yield component

    for name in sorted(GRAPH):
        if name not in index:
            yield from visit(name)


def stale(kind: str, entries: set[str]) -> None:
    if entries:
        warnings.warn(f"tests/test_structure.py: these {kind} no longer offend; delete them from the list: "
                      f"{sorted(entries)}", stacklevel=2)


# -- the analysis itself, on hand-made cases -------------------------------------------------------
def test_the_reader_resolves_relative_lazy_and_type_only_imports() -> None:
    # a relative import of a module, of a name in a package, a lazy import and a TYPE_CHECKING one
    assert {"dora_lab.core.registry", "dora_lab.run.config_yaml", "dora_lab.run.rows"} <= GRAPH["dora_lab.run.cli"]
    assert "dora_lab.plan.report_block" in GRAPH["dora_lab.study.runner"]  # imported inside a function
    assert "dora_lab.run.callbacks" in GRAPH["dora_lab.plan.objectives"]  # under `if TYPE_CHECKING:`
    assert GRAPH["dora_lab.metrics.magnitude"] >= {"dora_lab.core.scorers"}  # metrics/ as installed
    assert all(target.startswith("dora_lab") for targets in GRAPH.values() for target in targets)


def test_the_layer_rule_on_hand_made_arrows() -> None:
    assert not wrong_way("dora_lab.run.train", "dora_lab.core.adapter")  # down
    assert not wrong_way("dora_lab.study.trial", "dora_lab.study.samplers")  # within its package
    assert wrong_way("dora_lab.core.controller", "dora_lab.run.config")  # up
    assert wrong_way("dora_lab.report.io", "dora_lab.study.tables")  # beside
    assert wrong_way("dora_lab.core.scorers", "dora_lab.metrics.magnitude")  # core must not know metrics/
    assert wrong_way("dora_lab.run.models", "dora_lab")  # the facade is above everything
    assert not wrong_way("dora_lab.train", "dora_lab.run.train")
    assert not wrong_way("dora_lab.study.__main__", "dora_lab.studies")  # python -m's script is an entry point
    assert wrong_way("dora_lab.study.runner", "dora_lab.report.compare")  # beside
    assert not wrong_way("dora_lab.report.io", "dora_lab.plan.setup")  # down: plan is below report and study


# -- the package ---------------------------------------------------------------------------------
def test_imports_point_down_the_layers() -> None:
    arrows = {(m, t) for m, targets in GRAPH.items() for t in targets if wrong_way(m, t)}
    new = sorted(arrows - ALLOWED_ARROWS)
    assert not new, ("imports that point up a layer or sideways (core <- methods, metrics <- run <- track <- "
                     f"study; report and export beside study): {new}")
    stale("arrows", {f"{m} -> {t}" for m, t in ALLOWED_ARROWS - arrows})


def test_no_import_circle() -> None:
    found = list(circles())
    new = [sorted(c) for c in found if c not in ALLOWED_CIRCLES]
    assert not new, f"modules that import each other (directly or round a loop): {new}"
    stale("circles", {" <-> ".join(sorted(c)) for c in ALLOWED_CIRCLES if c not in found})


def source_files() -> Iterator[tuple[str, str]]:
    for folder in ROOTS:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text()


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """Every function and method, nested ones included, as (qualified name, lines from def to end)."""
    for node in ast.iter_child_nodes(tree):
        name = f"{prefix}{getattr(node, 'name', '')}"
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield name, (node.end_lineno or node.lineno) - node.lineno + 1
            yield from functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{name}.")
        else:
            yield from functions(node, prefix)


def test_functions_are_measured_with_their_qualified_names() -> None:
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n\n        return 1\n")
    assert dict(functions(tree)) == {"A.f": 5, "A.f.g": 2}


def test_no_module_over_400_lines_and_no_function_over_80() -> None:
    long_modules, long_functions = set(), set()
    for path, text in source_files():
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.add(path)
        long_functions |= {f"{path}::{name}" for name, lines in functions(ast.parse(text))
                           if lines > MAX_FUNCTION_LINES}
    new_modules, new_functions = long_modules - ALLOWED_LONG_MODULES, long_functions - ALLOWED_LONG_FUNCTIONS
    assert not new_modules, f"modules over {MAX_MODULE_LINES} lines: split them: {sorted(new_modules)}"
    assert not new_functions, f"functions over {MAX_FUNCTION_LINES} lines: split them: {sorted(new_functions)}"
    stale("long modules", ALLOWED_LONG_MODULES - long_modules)
    stale("long functions", ALLOWED_LONG_FUNCTIONS - long_functions)


def is_shim(tree: ast.Module) -> bool:
    """Whether a module's body is imports only, besides its docstring and ``__all__``: it defines
    nothing, it passes on names that live elsewhere.  A package's ``__init__`` may do that (it is the
    package's front), so the test below does not ask it."""
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    imports = [node for node in body if isinstance(node, ast.Import | ast.ImportFrom)
               and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    rest = [node for node in body if not isinstance(node, ast.Import | ast.ImportFrom)]
    only_all = all(isinstance(node, ast.Assign | ast.AnnAssign) and _assigns_all(node) for node in rest)
    return bool(imports) and only_all


def _assigns_all(node: ast.Assign | ast.AnnAssign) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return all(isinstance(target, ast.Name) and target.id == "__all__" for target in targets)


def test_a_shim_is_told_from_a_module_that_defines_something() -> None:
    shim = '"""Old path."""\nfrom __future__ import annotations\n\nfrom ..plan.setup import prepare\n__all__ = ["prepare"]\n'
    assert is_shim(ast.parse(shim))
    assert is_shim(ast.parse("from ..plan import setup as setup\n"))
    assert not is_shim(ast.parse(shim + "X = 1\n"))  # defines a constant
    assert not is_shim(ast.parse(shim + "def f() -> None:\n    pass\n"))
    assert not is_shim(ast.parse('"""Only a docstring."""\n__all__: list[str] = []\n'))  # imports nothing
    assert not is_shim(ast.parse("from .run.train import main\n\nif __name__ == '__main__':\n    main()\n"))


def test_no_re_export_shim() -> None:
    shims = {name for name, path in MODULES.items()
             if path.name != "__init__.py" and is_shim(ast.parse(path.read_text()))}
    new = sorted(shims - ALLOWED_SHIMS)
    assert not new, ("modules that only re-export names from elsewhere: import those names from their one home "
                     f"and delete the module: {new}")
    stale("shims", ALLOWED_SHIMS - shims)


def top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A module's statements that bind its names: its body and the bodies of its ``if``/``try``/``with``/
    ``for`` blocks, not what a function or class body binds."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.Try | ast.With | ast.For):
            for block in ("body", "orelse", "finalbody"):
                yield from top_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from top_level(handler.body)


def bindings(tree: ast.Module, name: str | None = None) -> tuple[set[str], dict[str, str], list[str]]:
    """What module ``name``'s top level binds: the names it defines (``def``, ``class``, an assignment),
    the names it imports (each with the module it reads: :func:`from_base`), and its ``__all__``."""
    defined: set[str] = set()
    imports: dict[str, str] = {}
    listed: list[str] = []
    for node in top_level(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Import):
            imports |= {alias.asname or alias.name.partition(".")[0]: alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports |= {alias.asname or alias.name: from_base(name, node) for alias in node.names}
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
            defined |= names - {"__all__"}
            if "__all__" in names:
                listed += [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant)
                           and isinstance(n.value, str)]
    return defined, imports, listed


def re_exports(tree: ast.Module) -> set[str]:
    """The names a module lists in ``__all__`` that it imports instead of defining."""
    defined, imports, listed = bindings(tree)
    return {n for n in listed if n in imports and n not in defined}


def test_a_re_export_is_told_from_a_defined_name() -> None:
    tree = ast.parse("from .x import a\nfrom y import b as c\nimport os.path\n\ndef f():\n    from z import d\n\n"
                     "class K:\n    pass\n\nV: int = 1\n__all__ = ['a', 'c', 'f', 'K', 'V', 'd']\n__all__ += ['os']\n")
    assert re_exports(tree) == {"a", "c", "os"}  # d is imported inside f: not a name of the module
    fallback = "try:\n    from x import g\nexcept ImportError:\n    def g():\n        pass\n__all__ = ('g',)\n"
    assert re_exports(ast.parse(fallback)) == set()  # defined here when the import fails
    assert re_exports(ast.parse("from x import a\n__all__ = ['a'] + ['b']\n")) == {"a"}
    assert re_exports(ast.parse("from x import a\n")) == set()  # imported, not listed: not passed on


def test_no_module_re_exports_an_imported_name() -> None:
    found = {f"{name}: {n}" for name, path in MODULES.items() if path.name != "__init__.py"
             for n in re_exports(ast.parse(path.read_text()))}
    new = sorted(found - ALLOWED_RE_EXPORTS)
    assert not new, ("names a module lists in __all__ but imports from elsewhere (a second import path for one "
                     "name): import each from the module that defines it, and drop it from this __all__: "
                     f"{new}")
    stale("re-exports", ALLOWED_RE_EXPORTS - found)


BINDINGS = {name: bindings(ast.parse(path.read_text()), name) for name, path in MODULES.items()}


def second_path(module: str, name: str) -> bool:
    """Whether ``from module import name`` takes a package name from a module that is not its home:
    ``module`` (not a package's front) imports ``name`` from elsewhere in the package and does not
    define it (a name it takes from outside the package, such as matplotlib's ``plt``, is not asked)."""
    if module not in MODULES or MODULES[module].name == "__init__.py" or f"{module}.{name}" in MODULES:
        return False
    defined, imports, _ = BINDINGS[module]
    return name in imports and name not in defined and nearest_module(imports[name]) is not None


def second_paths(tree: ast.Module, name: str | None) -> set[str]:
    """The imports, lazy ones included, of module ``name`` (None: a file outside the package) that take
    a name from a module that is not its home, as "module.name"."""
    return {f"{base}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for base in [from_base(name, node)] for alias in node.names if second_path(base, alias.name)}


def test_a_second_import_path_is_told_from_the_home() -> None:
    assert second_path("dora_lab.run.config", "ConfigError")  # run/config.py uses it; its home is config_yaml
    assert not second_path("dora_lab.run.config_yaml", "ConfigError")
    assert not second_path("dora_lab.report", "Run")  # a package's front
    assert not second_path("dora_lab.report", "compare")  # a module
    assert not second_path("dora_lab.track.plots", "plt")  # matplotlib's, not the package's
    lazy = ast.parse("def f() -> None:\n    from .config import ConfigError, RunConfig\n")
    assert second_paths(lazy, "dora_lab.run.train") == {"dora_lab.run.config.ConfigError"}
    assert second_paths(ast.parse("from ..run.config import RunConfig\n"), "dora_lab.study.trial") == set()
    assert second_paths(ast.parse("from dora_lab.run.data import DataError\n"), None) == {"dora_lab.run.data.DataError"}
    assert second_paths(ast.parse("from .speed import timing\n"), None) == set()  # a file outside the package


def test_every_import_names_the_home_of_what_it_imports() -> None:
    installed = {path: name for name, path in MODULES.items()}
    found = {f"{path.relative_to(REPO).as_posix()}: {hit}" for folder in SCANNED
             for path in sorted((REPO / folder).rglob("*.py"))
             for hit in second_paths(ast.parse(path.read_text()), installed.get(path))}
    new = sorted(found - ALLOWED_SECOND_PATHS)
    assert not new, ("imports of a name from a module that only imports it too (a second import path): import "
                     f"it from the module that defines it (or its package's __init__): {new}")
    stale("second import paths", ALLOWED_SECOND_PATHS - found)
