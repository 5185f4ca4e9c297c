"""Which studies a report reads, from its command line (:func:`sources_of`), and which plugin code it
may run to read them (:func:`check_plugins`: only what the configs named on the command line list)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..run.config_yaml import ConfigError, apply_overrides, parse_assignment, plugins_origin, read_yaml
from ..run.names import check_name
from .io import Source, source_from_config

__all__ = ["check_plugins", "sources_of"]


def sources_of(args: argparse.Namespace) -> list[Source]:
    """The studies a report reads: the command line's configs or named studies, then the first one's
    ``report.include`` (each study once), running only the plugins :func:`check_plugins` allows."""
    sources: list[Source] = []
    trusted: set[str] = set()  # plugins named by the command line's configs (or --set), or --trust-plugins
    for spec in args.study:
        if Path(spec).is_file():
            check_plugins(Path(spec), args, trusted, None)
            sources.append(source_from_config(spec, args.overrides))
        elif not args.storage:
            raise ConfigError(f"{spec!r} is not a config file; to name a study give its --storage as well")
        else:
            sources.append(Source(name=check_name("STUDY", spec), storage=args.storage,
                                  experiment=check_name("--experiment", args.experiment or spec),
                                  tracking_uri=args.tracking_uri, metric=args.metric))
    first = sources[0]
    for item in first.report.get("include", []):
        path = first.path.parent / item if first.path else Path(item)
        if path.suffix in (".yaml", ".yml"):
            check_plugins(path, args, trusted, f"report.include of {first.path or first.name}")
            sources.append(source_from_config(path, args.overrides))
        else:
            sources.append(Source(name=check_name("report.include", item), storage=first.storage,
                                  tracking_uri=first.tracking_uri, experiment=item, output_dir=first.output_dir,
                                  metric=None))  # unknown here: each run's metrics.json says it
    unique = {(s.name, s.storage): s for s in reversed(sources)}  # a study named twice counts once
    return [s for s in sources if unique.get((s.name, s.storage)) is s]


def check_plugins(path: Path, args: argparse.Namespace, trusted: set[str], included: str | None) -> None:
    """Refuse to run plugin code that only another file lists: a ``base:`` of a config named on the
    command line, or a config pulled in through ``report.include`` (``included`` says whose), unless
    ``--trust-plugins``; say on stderr which plugin files and modules will run, and from which config."""
    plugins = [str(p) for p in apply_overrides(read_yaml(path), args.overrides).get("plugins") or []]
    if not plugins:
        return
    by_cli = any(parse_assignment(o)[0] == "plugins" for o in args.overrides)
    origin = "--set plugins" if by_cli else str(plugins_origin(path))
    own = by_cli or (included is None and Path(origin).resolve() == path.resolve())
    if not (own or args.trust_plugins or set(plugins) <= trusted):
        where = f"{origin}, pulled in through " + (included or f"base: of {path}")
        raise ConfigError(f"{where}, lists plugins {plugins}: Python code that report runs only from the config "
                          f"named on its command line.  Read it, then pass --trust-plugins to run it, or list it "
                          f"under plugins in the config you name")
    trusted.update(plugins)
    print(f"report: runs plugins listed in {origin}: {', '.join(plugins)}", file=sys.stderr)
