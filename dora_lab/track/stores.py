"""Damaged or full stores: one ``error:`` that names the store and what to do, never a traceback.

A study has two stores, Optuna's (``study.storage``) and MLflow's (``study.tracking_uri``).

- :func:`check_sqlite_store`: before any work, a SQLite store file that exists is checked read-only
  (SQLite's ``PRAGMA quick_check``, milliseconds on a study's database); a damaged one (garbage, a
  truncated copy) raises :class:`StoreError` and the CLI refuses it (exit 2), nothing started.
- :func:`store_failure`: which store, if any, an exception raised during the work came from (a
  commit that fails on a full disk, a file damaged under a running study): the runner closes what
  it started and stops with :func:`store_message` (exit 1).

Which store failed is read from where the database error was raised (Optuna's or MLflow's code),
so every call into either library is covered without wrapping each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import traceback
from pathlib import Path

import optuna
import sqlalchemy.exc

__all__ = ["StoreError", "check_sqlite_store", "hide_store_tracebacks", "store_failure", "store_message"]

#: store -> (its name in messages, the config key that sets it)
STORES = {"optuna": ("Optuna", "study.storage"), "mlflow": ("MLflow", "study.tracking_uri")}
_DATABASE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, optuna.exceptions.StorageInternalError)


class StoreError(Exception):
    """A store that cannot be read or written; the message names it, the key that sets it and the fix."""


def store_message(store: str, url: str, problem: str, key: str | None = None) -> str:
    """What went wrong with ``store`` (``optuna`` or ``mlflow``) at ``url``, and the two fixes."""
    from .links import safe_url

    name, default_key = STORES[store]
    key = key or default_key
    return (f"the {name} store {safe_url(url)} ({key}) cannot be used: {problem.strip()}. If its disk is "
            f"full, free space and run the same command again (finished trials are kept); if the file is "
            f"damaged, restore it from a backup, or set {key} to a new database (a new, empty store)")


def check_sqlite_store(url: str, store: str, key: str | None = None) -> None:
    """Raise :class:`StoreError` when ``url`` is a ``sqlite:///`` file that exists and is damaged.
    Opens it read-only: nothing is written, a missing file is left to be created."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///")).expanduser()
    if not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return  # another process is writing it (creating a store, say): busy, not damaged
        problem: str | None = f"{exc} (SQLite)"
    else:
        problem = None if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3]) + " (SQLite's quick_check)"
    if problem is not None:
        raise StoreError(store_message(store, url, f"{path} is damaged: {problem}", key))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def store_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(store, problem)`` when ``exc`` is (or was raised from) a database error that the code of a
    store raised: ``store`` is ``optuna`` or ``mlflow`` (the innermost frame in either library
    decides), ``problem`` the database's own words.  ``None`` for anything else."""
    chain = _chain(exc)
    errors = [e for e in chain if isinstance(e, _DATABASE_ERRORS)]
    if not errors:
        return None
    problem = (str(errors[-1]).strip().splitlines() or [type(errors[-1]).__name__])[0]
    for e in reversed(chain):  # the root cause first, its innermost frame first
        for frame in reversed(traceback.extract_tb(e.__traceback__)):
            for store in STORES:
                if f"{os.sep}{store}{os.sep}" in frame.filename:
                    return store, problem
    return None


def _no_database_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def hide_store_tracebacks() -> None:
    """MLflow logs each database error it re-raises with the whole traceback (logger
    ``mlflow.store.db.utils``); a study reports a failing store itself, in one error (or a trial's
    ``fail_reason``), so those records are dropped.  Its INFO lines (creating a store) stay."""
    logging.getLogger("mlflow.store.db.utils").addFilter(_no_database_errors)
