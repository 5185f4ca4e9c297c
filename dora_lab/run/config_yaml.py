"""Config files in: YAML (a key written twice refused), ``base:`` chains, ``--set`` assignments.

The one reader of the ``base:`` chain (:func:`read_yaml`): a file overrides its base key by key;
the ``study:`` block merges by its own rule (:func:`_merge_study`); relative plugin paths are
relative to the file that names them.  :func:`set_values` is the one way a dotted key is set
(``--set``, a study's overrides and sampled values).  Typed validation of what is read is in
:mod:`dora_lab.run.config`; import this module's names from here, their one home.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "ConfigError", "apply_overrides", "load_yaml", "parse_assignment",
           "plugins_origin", "read_yaml", "set_values"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], top: bool = False) -> dict[str, Any]:
    """Override ``base`` key by key.  A section whose ``name`` changes (``scorer``) does not
    inherit the old ``params``: they belonged to the other implementation.  At the top level the
    ``study:`` block has its own rule (:func:`_merge_study`)."""
    out = copy.deepcopy(base)
    if "name" in over and over["name"] != out.get("name"):
        out.pop("params", None)
    for key, value in over.items():
        if top and key == "study":
            out[key] = _merge_study(out.get(key), value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_study(base: Any, own: Any) -> Any:
    """A file's ``study:`` block over its base's: key by key, each key *replacing* the base's (an
    ablation grid does not inherit the base study's ``space``, ``sampler`` or ``pruner``) except
    ``overrides``, merged by key; ``study: null`` keeps the base's block."""
    if own is None:
        return copy.deepcopy(base)
    if not isinstance(own, dict):
        raise ConfigError(f"study must be a mapping of keys, got {type(own).__name__}")
    out = dict(base or {})
    for key, value in own.items():
        if key == "overrides" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following ``base:`` links (relative to the file); relative ``plugins:``
    file paths are made relative to the file that names them too (absolute in the result).  The one
    reader of the ``base:`` chain: the run config, the ``study:`` block (merged by its own rule,
    :func:`_merge_study`) and the ``report:`` block all come from here."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config {str(path)!r} includes itself through 'base'")
    data = load_yaml(path)
    if data == {}:  # defaults alone would run (a study: n_trials identical trials, nothing searched)
        raise ConfigError(f"config {str(path)!r} is empty: it sets no key; start from configs/cola.yaml "
                          f"(or write base: <a config> and the keys to change)")
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of keys, got {type(data).__name__}")
    if data.get("study") is not None and not isinstance(data["study"], dict):
        raise ConfigError(f"study must be a mapping of keys, got {type(data['study']).__name__}")
    plugins = data.get("plugins")
    if isinstance(plugins, list):  # like base: a plugin file is found next to the YAML that names it
        data["plugins"] = [_relative_to(path, p) for p in plugins]
    base = data.pop("base", None)
    if base is None:
        return data
    parent = read_yaml(path.parent / base, _seen + (path.resolve(),))
    return _deep_merge(parent, data, top=True)


def plugins_origin(path: str | Path) -> Path:
    """The file of ``path``'s ``base:`` chain whose ``plugins:`` list the merged config keeps (the
    nearest that has the key: a file's list replaces its base's); ``path`` itself when none has one.
    For ``report``, which runs plugin code only from the config named on its command line."""
    path = Path(path)
    for _ in range(100):  # read_yaml has already refused a loop; this only bounds the walk
        data = load_yaml(path)
        if not isinstance(data, dict) or "plugins" in data or data.get("base") is None:
            return path
        path = path.parent / str(data["base"])
    return path


def _relative_to(config: Path, plugin: Any) -> Any:
    """A relative plugin file path as a path relative to the folder of ``config`` (absolute)."""
    from ..core.registry import is_plugin_file

    if not isinstance(plugin, str) or not is_plugin_file(plugin) or Path(plugin).expanduser().is_absolute():
        return plugin
    return str((config.parent / plugin).resolve())


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: YAML keeps
    the last one and silently drops the first, which is never what the writer meant."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may override on purpose
                continue
            try:
                key = self.construct_object(key_node, deep=True)
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML say so
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} is written twice (lines "
                                    f"{first} and {key_node.start_mark.line + 1}); YAML would silently keep only "
                                    "the last one: remove or rename one of them")
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    pass


#: Bounds on one YAML document, far above any config's (the shipped ones: at most 4 KB, 5 deep, 194
#: values): a file past them is refused before PyYAML builds it.  ``MAX_NODES`` counts values as
#: the config *means* them, every alias expanded: an alias bomb (``&a [*b, *b, ...]`` nested 9 deep)
#: is a few hundred bytes and 9^9 values, which anything that walks the config (a copy, a dump, MLflow
#: params) would expand without bound.
MAX_BYTES = 1_000_000
MAX_DEPTH = 100
MAX_NODES = 100_000


def load_yaml(path: str | Path) -> Any:
    """One YAML file (safe loader), a key written twice refused; :class:`ConfigError` names the file
    and the line.  Every config file dora_lab reads goes through here: read as UTF-8 (the byte that
    is not is named), and bounded (:data:`MAX_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_NODES`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"config {str(path)!r} is {len(raw):,} bytes, more than a config may be "
                          f"({MAX_BYTES:,}); is it the right file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config {str(path)!r} is not UTF-8 text: byte {exc.start} (0x{raw[exc.start]:02x}, line "
                          f"{line}) cannot be decoded; save the file as UTF-8") from None
    try:
        _check_bounds(text)
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except (_DuplicateKey, _TooBig) as exc:
        raise ConfigError(f"config {str(path)!r}, {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {exc}") from exc


class _TooBig(yaml.YAMLError):
    pass


def _line(event: yaml.Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


def _check_bounds(text: str) -> None:
    """Raise :class:`_TooBig` when the document nests deeper than :data:`MAX_DEPTH` or holds more
    than :data:`MAX_NODES` values with its aliases expanded, or an alias refers to a node that
    contains it (a recursive structure).  Walks PyYAML's event stream (its parser is iterative;
    its composer, which recurses and would end in ``RecursionError``, has not run yet)."""
    sizes: dict[str, int] = {}  # anchor -> the expanded size of its node
    stack: list[list[Any]] = []  # open collections: [anchor, size so far]
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([event.anchor, 1])
            if len(stack) > MAX_DEPTH:
                raise _TooBig(f"line {_line(event)}: nested more than {MAX_DEPTH} deep; "
                              "a config is a few levels of keys")
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = stack.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:  # undefined (PyYAML says so), or still open: recursive
                if any(a == event.anchor for a, _ in stack):
                    raise _TooBig(f"line {_line(event)}: alias *{event.anchor} refers to a node "
                                  "that contains it (a recursive structure); a config cannot be one")
                continue
            anchor, size = None, sizes[event.anchor]
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        if stack:
            stack[-1][1] += size
        else:
            total += size
        if total + sum(s for _, s in stack) > MAX_NODES:
            raise _TooBig(f"line {_line(event)}: more than {MAX_NODES:,} values once its aliases "
                          "(*name) are expanded (an alias bomb?); write the values out, or use fewer aliases")


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (values parsed as YAML) to a config dict."""
    return set_values(data, [parse_assignment(item) for item in overrides])


def set_values(data: Mapping[str, Any], pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted ``key.path`` set to its value (replacing what was there).

    Renames go first, and a section whose ``name`` changes loses its ``params``: a new scorer does
    not inherit the old one's hyper-parameters, then its own ``params`` (if given) apply.  The
    command line's ``--set`` and a study's overrides and sampled values all go through here."""
    out = copy.deepcopy(dict(data))
    for key, value in sorted(pairs, key=lambda kv: not kv[0].endswith(".name")):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        if parts[-1] == "name" and value != node.get("name"):
            node.pop("params", None)
        node[parts[-1]] = copy.deepcopy(value)
    return out


def parse_assignment(item: str, flag: str = "--set") -> tuple[str, Any]:
    """``"key.path=value"`` -> ``("key.path", value)``, the value read as YAML (``3e-4`` a number;
    nothing after ``=`` is null).  Every ``KEY=VALUE`` argument of the CLIs goes through here."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} expects key.path=value, got {item!r}")
    if not raw.strip():
        return key.strip(), None
    try:
        _check_bounds(raw)
        return key.strip(), _number_or(yaml.safe_load(raw))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {key.strip()}: cannot parse value {raw!r}: {exc}") from exc


def _number_or(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string; people mean the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value
