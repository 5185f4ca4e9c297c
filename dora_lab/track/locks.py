"""One cross-process lock per store, for the two moments where processes that share an Optuna
storage or an MLflow store would otherwise race and the store does not protect them:

- creating a fresh database (its tables, MLflow's migrations): two studies started together on a
  new folder both find no tables and both create them; one crashes;
- a grid study's claim of its next point: reading which points are taken and creating the trial
  that takes one must be one step, or two processes take the same point.

Where the lock lives depends on the store's URL:

- ``sqlite:///PATH``, a plain path or ``file://`` (MLflow's file store): ``fcntl.flock`` on
  ``PATH.lock`` beside it.  SQLite is shared by processes of one machine only, and so is the lock;
  the kernel releases it when a process dies, so a killed process never leaves it held.
- ``postgresql://`` and ``mysql://``: a lock inside the server (``pg_advisory_lock`` /
  ``GET_LOCK``), so it holds across machines and is released when the connection closes.
- anything else (an MLflow server over HTTP, which serialises its own requests; in-memory
  storages): no lock.

Why a lock rather than retrying with backoff: a retry hides the crash but not its cause.  A
half-done migration can leave a database that a retry does not repair, and a retry after a claim
cannot take back a trial already created; with the lock the second process simply waits (seconds at
most) and then finds the work done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["store_lock"]


def _local_path(url: str) -> Path | None:
    """The file or folder behind a local store URL, ``None`` for a server or an in-memory store."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return Path(url) if "://" not in url and url.strip() else None


@contextlib.contextmanager
def store_lock(url: str, name: str = "create") -> Iterator[None]:
    """Hold an exclusive lock on the store at ``url`` (``name`` tells locks in one server apart;
    a local file has one lock) for the ``with`` block; other processes wait."""
    path = _local_path(url)
    if path is not None:
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released by close, or by the kernel if we die
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    scheme = url.partition("://")[0].split("+")[0]
    if scheme not in ("postgresql", "postgres", "mysql"):
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if scheme == "mysql":
                conn.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": f"dora_lab:{name}"[:64]})
            else:  # a signed 64-bit key from the name, the same in every process
                key = int.from_bytes(hashlib.sha256(f"dora_lab:{name}".encode()).digest()[:8], "big", signed=True)
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                if scheme == "mysql":
                    conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": f"dora_lab:{name}"[:64]})
                else:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()
