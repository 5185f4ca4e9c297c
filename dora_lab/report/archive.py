"""Runs read back from a committed report (``report.archives``): a study whose Optuna store and run
folders are gone (another machine, a fresh checkout) still has its report folder in the repository,
and its ``runs.csv`` holds each run's seed, value, last evaluation, size and environment.  With the
study config that made them, each row becomes a :class:`Run` whose config is the trial's config
rebuilt exactly as the study runner builds it, so the report groups and pairs it like a live run.

What an archive cannot give back: learning curves (the convergence flags are the ones the archived
report computed, from its ``flags.csv``), allocations and scores.  ``runs.csv`` records each trial's
sampled values (its ``params`` column); from a report made before it did, only a study whose search
space is its seeds alone can be read back.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..plan.setup import prepare, trial_config
from ..run.config import flatten
from ..run.config_yaml import ConfigError, apply_overrides, read_yaml
from .io import ENV_COLUMNS, Run, Source

__all__ = ["archived_runs"]


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _flag(text: str | None) -> bool | None:
    return {"True": True, "False": False}.get(text or "")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _environment(row: dict[str, str]) -> dict[str, Any]:
    env: dict[str, Any] = {k: row[k] for k in ENV_COLUMNS if row.get(k)}
    if str(env.get("threads", "")).isdigit():  # as metrics.json has it, so runs of one machine compare equal
        env["threads"] = int(env["threads"])
    return env


def archived_runs(source: Source, overrides: Sequence[str] = (), trust_plugins: bool = False
                  ) -> tuple[list[Run], list[str]]:
    """The runs ``source``'s ``report.archives`` names, and one note per archive saying where they
    came from (a study config that lists plugins only with ``trust_plugins``: reading it runs them).  :class:`ConfigError` (naming the file and the fix) for a missing config, folder or
    study, or a study that searched more than its seeds."""
    base = source.path.parent if source.path else Path.cwd()
    runs: list[Run] = []
    notes: list[str] = []
    for entry in source.report.get("archives") or []:
        config_path, folder = base / entry["study"], base / entry["report"]
        table = folder / "runs.csv"
        if not config_path.is_file():
            raise ConfigError(f"report.archives: no study config {config_path} (paths are relative to "
                              f"{source.path or 'the working folder'})")
        if not table.is_file():
            raise ConfigError(f"report.archives: no {table}; name a report folder written by python -m "
                              f"dora_lab.report (it holds runs.csv)")
        plugins = apply_overrides(read_yaml(config_path), overrides).get("plugins")
        if plugins and not trust_plugins:
            raise ConfigError(f"report.archives: {config_path} lists plugins {plugins}: Python code that report "
                              f"runs only when asked; read it, then pass --trust-plugins")
        setup = prepare(config_path, overrides)
        rows = _read_csv(table)
        mine = [r for r in rows if r.get("study") == setup.name]
        if not mine:
            names = sorted({r.get("study", "") for r in rows})
            raise ConfigError(f"report.archives: {table} has no runs of study {setup.name!r} ({config_path}); "
                              f"it has: {', '.join(names) or 'none'}")
        searched = sorted(set(setup.study.space) - {"seed"})
        if searched and not all(r.get("params") for r in mine):
            raise ConfigError(f"report.archives: {config_path} searches {', '.join(searched)} besides the seed, and "
                              f"{table} is from before runs.csv recorded each run's sampled values (its params "
                              f"column); make that report again from the study's store, or split the study into one "
                              f"file per value")
        flags = {(r.get("group"), r.get("seed"), r.get("trial")): r
                 for r in (_read_csv(folder / "flags.csv") if (folder / "flags.csv").is_file() else [])}
        metric = setup.metric
        for row in mine:
            seed = int(row["seed"])
            params = json.loads(row["params"]) if row.get("params") else {"seed": seed}
            config = flatten(yaml.safe_load(trial_config(setup.data, setup.study, params, setup.cli).to_yaml()))
            flag = flags.get((row.get("group"), row["seed"], row.get("trial")), {})
            final = _number(row.get("final"))
            size = _number(row.get("adapter_parameters_final"))
            archived = {"folder": str(folder), "components": int(row["components"]) if row.get("components") else None,
                        "still_rising": _flag(flag.get("still_rising")), "at_majority": _flag(flag.get("at_majority")),
                        "evaluations": int(flag["evaluations"]) if str(flag.get("evaluations", "")).isdigit() else 0,
                        "last_gain": _number(flag.get("last_gain")), "fitted_rise": _number(flag.get("fitted_rise"))}
            metrics: dict[str, Any] = {"metric": metric, "final": {} if math.isnan(final) else {metric: final},
                                       "environment": _environment(row), "archived": archived}
            if not math.isnan(size):
                metrics["adapter_parameters_final"] = int(size)
            runs.append(Run(study=setup.name, trial=int(row["trial"]), seed=seed, value=float(row["value"]),
                            config=config, metrics=metrics, minutes=_number(row.get("minutes")),
                            mlflow_run_id=row.get("mlflow_run_id", ""), metric=metric, params=params))
        notes.append(f"{len(mine)} run(s) of `{setup.name}` are read from the archive {table} (report.archives): "
                     f"their configs rebuilt from {config_path}; no learning curves, allocations or scores, and "
                     f"their convergence flags are those the archived report computed")
    return runs, notes
