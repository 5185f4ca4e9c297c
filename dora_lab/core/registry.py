"""Name -> implementation registries for scorers, schedules, regularisers and tasks.

One small generic :class:`Registry` serves all four.  Registering checks the name (lowercase,
``[a-z][a-z0-9_]*``) and refuses a clash with a message that says how to fix it; looking up an
unknown name lists every registered name.  Built-ins register themselves when their module is
imported, and a registry built with ``packages=`` imports every module of those packages on first
lookup (so a new built-in is one new file); third-party packages register through the entry-point groups ``dora_lab.scorers``,
``dora_lab.schedules``, ``dora_lab.regularizers`` and ``dora_lab.tasks`` (each entry point names a
module to import),
and a config can name extra modules or ``.py`` files to import (:func:`import_plugins`).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["Registry", "RegistryError", "build_checked", "discover_modules", "import_plugins", "is_plugin_file"]

T = TypeVar("T")
_NAME = re.compile(r"[a-z][a-z0-9_]*")  # fullmatch: "$" would let a trailing newline through


class RegistryError(ValueError):
    """A bad registration or an unknown name."""


class Registry(Generic[T]):
    """A checked mapping from lowercase names to implementations.

    ``kind`` is used in messages ("scorer", "schedule"), ``group`` is the entry-point group
    scanned once on first lookup, and ``check`` validates an object's shape at registration
    (it raises :class:`RegistryError` with a message).  On first lookup the registry imports the
    modules named in ``builtins`` and every module of each package in ``packages`` (found by
    :func:`discover_modules`), then the entry points.
    """

    def __init__(
        self,
        kind: str,
        group: str,
        check: Callable[[str, object], None] | None = None,
        builtins: Iterable[str] = (),
        packages: Iterable[str] = (),
    ) -> None:
        self.kind = kind
        self.group = group
        self._check = check
        self._builtins = tuple(builtins)
        self._packages = tuple(packages)
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._loaded = False

    # -- registration -------------------------------------------------------------------------
    def add(self, name: str, obj: T, *, replace: bool = False, origin: str | None = None) -> T:
        """Register ``obj`` as ``name``.  ``origin`` (default: the object's module and qualified
        name) says where it came from in a clash's message; registering again from the same origin
        replaces it quietly (a re-run notebook cell)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            # Suggest a fixed name only when the fix is itself a valid name.
            fixed = re.sub(r"[^a-z0-9_]+", "_", str(name).strip().lower()).strip("_")
            hint = f" (for example {fixed!r})" if _NAME.fullmatch(fixed) else ""
            raise RegistryError(
                f"invalid {self.kind} name {name!r}: use lowercase letters, digits and '_', "
                f"starting with a letter{hint}"
            )
        if self._check is not None:
            self._check(name, obj)
        # Load the built-ins and entry points first, so a clash with one of them is refused here,
        # with this message, instead of breaking the built-in's import at the first lookup.
        self._ensure_loaded()
        if origin is None:
            origin = getattr(obj, "__module__", "?") + "." + getattr(obj, "__qualname__", repr(obj))
        if name in self._items and not replace and self._origin.get(name) != origin:
            raise RegistryError(
                f"{self.kind} {name!r} is already registered by {self._origin[name]}; "
                f"pick another name, or pass replace=True to override it on purpose"
            )
        self._items[name] = obj
        self._origin[name] = origin
        return obj

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests use this to clean up after themselves)."""
        self._items.pop(name, None)
        self._origin.pop(name, None)

    # -- lookup -------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtins + tuple(m for p in self._packages for m in discover_modules(p)):
            importlib.import_module(module)
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not hide the built-ins
                print(f"dora_lab: could not load {self.kind} plugin {ep.name!r} ({ep.value}): {exc}",
                      file=sys.stderr)

    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}. "
                f"To add one, decorate it with @register_{self.kind}({name!r}) in a module that is "
                f"imported (config key 'plugins', or the entry-point group '{self.group}')"
            ) from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    # -- read like a dict, in registration order (``for name in TASKS``, ``TASKS.values()``) -------
    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(list(self._items))

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._items)

    def values(self) -> list[T]:
        self._ensure_loaded()
        return list(self._items.values())


def discover_modules(package: str) -> list[str]:
    """The full names of ``package``'s modules and subpackages, sorted (``dora_lab.metrics.magnitude``, ...).

    Found from the package's folder(s) by :func:`pkgutil.iter_modules`, without importing them;
    names starting with ``_`` are skipped (private helpers)."""
    try:
        pkg = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise
        # methods/ and metrics/ are installed as dora_lab.methods / dora_lab.metrics (setup.py): an
        # editable install made before that mapping does not know these names
        raise ModuleNotFoundError(
            f"no module named {package!r}: if this is a source checkout installed with `pip install -e` before "
            f"methods/ and metrics/ became dora_lab.methods and dora_lab.metrics, refresh the install with "
            f"`.venv/bin/python -m pip install -e . --no-deps` (or `bash scripts/setup.sh`)", name=package) from exc
    return sorted(f"{package}.{info.name}" for info in pkgutil.iter_modules(getattr(pkg, "__path__", []))
                  if not info.name.startswith("_"))


def is_plugin_file(plugin: str) -> bool:
    """A ``plugins`` entry names a file (``path/to/file.py``), not a module (``package.module``)."""
    return plugin.endswith(".py") or "/" in plugin


def import_plugins(plugins: Iterable[str]) -> None:
    """Import extra modules (``package.module``) or files (``path/to/file.py``) that register things.

    Either way the plugin is Python code, run in this process.  A file path is taken as given
    (relative to the current folder); :func:`dora_lab.run.config_yaml.read_yaml` makes a config's relative
    paths relative to the YAML file that names them.  A plugin that fails to import is a
    :class:`RegistryError` naming the plugin, the file and line, and the config key."""
    for plugin in plugins:
        if is_plugin_file(plugin):
            path = Path(plugin).expanduser()
            if not path.is_file():
                raise RegistryError(f"plugin file {plugin!r} does not exist (config key 'plugins')")
            mod_name = f"dora_lab_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise RegistryError(f"cannot import plugin file {plugin!r}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException as exc:
                # Forget the half-run module, or the next call would skip the (fixed) file silently.
                del sys.modules[mod_name]
                if isinstance(exc, Exception):
                    raise _plugin_error(f"plugin file {plugin!r}", exc, path) from exc
                raise
        else:
            try:
                importlib.import_module(plugin)
            except Exception as exc:
                missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
                if missing and f"{plugin}.".startswith(f"{missing}."):  # the plugin itself is not there
                    raise RegistryError(
                        f"cannot import plugin module {plugin!r} (config key 'plugins'): {exc}"
                    ) from exc
                raise _plugin_error(f"plugin module {plugin!r}", exc) from exc


def _plugin_error(what: str, exc: Exception, path: Path | None = None) -> RegistryError:
    """``what`` (a plugin, config key 'plugins') failed while being imported: say where, by file and line.

    A plugin is Python code run on import; the line is the syntax error's, else the deepest line of
    the traceback inside ``path`` (a file plugin) or of its last frame (a module plugin)."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename or path}, line {exc.lineno}"
        detail = f"SyntaxError: {exc.msg}"
    else:
        frames = list(traceback.extract_tb(exc.__traceback__))
        if path is not None:
            mine = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
            frames = mine or frames
        where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else str(path or "?")
        detail = f"{type(exc).__name__}: {exc}"
    return RegistryError(f"{what} (config key 'plugins') failed on import at {where}: {detail}")


def build_checked(kind: str, name: str, cls: Callable[..., T], allowed: dict[str, object], params: dict[str, object]) -> T:
    """``cls(**params)`` once every key of ``params`` is one of ``allowed`` (name -> default); an
    unknown key is refused by name with the valid ones and their defaults (scorers, methods)."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} has no hyper-parameter(s) {unknown}; it takes: "
            f"{', '.join(f'{k} (default {v})' for k, v in allowed.items()) or 'none'}"
        )
    return cls(**params)
