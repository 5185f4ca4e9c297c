"""How the command-line tools end when something is wrong: one paragraph on stderr, no traceback.

The exit codes are shared by ``dora_lab.train``, ``dora_lab.study`` and ``dora_lab.export``:

- 2 (:func:`refuse`): bad input found before any work (a config key, a data file, a model name, an
  output folder that cannot be written); nothing was started or stored.
- 1 (:func:`failed`): the work started and then failed (a diverging loss, a scorer that returns NaN);
  the message says what the run folder keeps.
- 130: stopped by Ctrl-C (SIGINT); 143: stopped by SIGTERM (what ``timeout``, Slurm, Kubernetes and
  schedulers send).

One mechanism stops a run on either signal: :func:`stop_on_signals` makes SIGTERM raise
:class:`Terminated`, a :class:`KeyboardInterrupt`, in the main thread, so every ``except
KeyboardInterrupt`` (the trial recorded FAIL, runs closed, the summary written, workers stopped) runs
for both; :func:`stop_reason` and :func:`stop_code` tell them apart in the messages and exit codes.
Neither signal is raised inside a call into a store (:func:`stop_safe`, :func:`deferred_stop`): it
waits for the call to end, so the clean-up that follows finds the store as the call left it.

:data:`INPUT_ERRORS` are the exceptions that mean "bad input": their messages already name the key,
file or row and the fix.  :func:`check_writable_folder` is the output-folder check made before work.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import ParamSpec, TypeVar

from ..core.registry import RegistryError
from .config_yaml import ConfigError
from .models import ModelLoadError
from .rows import DataError

__all__ = ["EXIT_FAILED", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "INPUT_ERRORS", "Terminated",
           "check_writable_folder", "deferred_stop", "failed", "refuse", "stop_code", "stop_on_signals",
           "stop_reason", "stop_safe", "stoppable"]

EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended

#: Bad input, each with a message that names the key, file or row: exit 2, nothing started.
INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ModelLoadError, RegistryError)


def refuse(exc: BaseException | str) -> int:
    """Report bad input found before any work; the exit code (2) for ``main`` to return."""
    print(f"error: {exc}\nNothing was started or stored.", file=sys.stderr)
    return EXIT_INPUT


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised by :func:`stop_on_signals`'s handler): handled wherever Ctrl-C is."""


def stop_reason(exc: KeyboardInterrupt) -> str:
    """The ``fail_reason`` of a trial or run stopped by ``exc``: ``terminated (SIGTERM)`` or
    ``interrupted (KeyboardInterrupt / Ctrl-C)``.  Both mean "not the trial's fault" (a grid point
    stopped this way runs again)."""
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (KeyboardInterrupt / Ctrl-C)"


def stop_code(exc: KeyboardInterrupt) -> int:
    """The exit code after stopping on ``exc``: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_held = 0  # the depth of deferred_stop() blocks the main thread is in
_pending: KeyboardInterrupt | None = None  # the stop that arrived inside one, raised when the outermost ends


def _stop(exc: KeyboardInterrupt) -> None:
    """Raise ``exc`` (from a signal handler) now, or keep it for the end of the outermost
    :func:`deferred_stop` block the main thread is in (the first stop is kept; later ones add nothing)."""
    global _pending
    if _held:
        if _pending is None:
            _pending = exc
        return
    raise exc


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """While inside, in the main thread: Ctrl-C and SIGTERM (under :func:`stop_on_signals`) are not
    raised; the first that arrived is raised when the outermost block ends.

    For the calls into a store.  A :class:`KeyboardInterrupt` raised between two lines of SQLAlchemy
    (in a commit, in a connection's return to its pool) can leave a connection checked out with its
    write transaction open, kept alive by the traceback; with SQLite that connection holds the file's
    write lock, and the clean-up's next write from this process waits past the busy timeout and
    fails with "database is locked".  Outside the main thread (where no signal handler runs) it does
    nothing."""
    global _held, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def _deferring(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with deferred_stop():
            return method(*args, **kwargs)
    return call


def stop_safe(cls: type[T]) -> type[T]:
    """A subclass of ``cls`` (a store client: MLflow's ``MlflowClient``, Optuna's ``RDBStorage``) whose
    every public method runs in :func:`deferred_stop`: a stop arrives between two calls into the
    store, never inside one.  Instances are still instances of ``cls``."""
    methods = {name: _deferring(attr) for name in dir(cls)  # plain methods (not static, class or property)
               if not name.startswith("_") and inspect.isfunction(attr := inspect.getattr_static(cls, name))}
    return type(cls.__name__, (cls,), {**methods, "__module__": __name__, "__doc__": cls.__doc__})


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` in the main thread, once; further SIGTERMs
    (a scheduler that signals every process of the job, then the parent forwarding it) are ignored
    so they cannot cut the clean-up short (SIGKILL still ends the process).  Ctrl-C (SIGINT) raises
    :class:`KeyboardInterrupt` as Python's own handler does, each time.  Neither is raised inside a
    :func:`deferred_stop` block (a call into a store): it is raised as that block ends.  The previous
    handlers are restored on leaving.  Outside the main thread (where handlers cannot be set) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            _stop(Terminated())

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        _stop(KeyboardInterrupt())

    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    previous_int = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def stoppable(main: Callable[P, int]) -> Callable[P, int]:
    """A CLI's ``main`` with SIGTERM handled as Ctrl-C (:func:`stop_on_signals`).  A stop that ``main``
    does not handle itself (one during start-up, before any work is stored) ends in one line and
    its exit code (130 or 143) instead of a traceback."""
    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        with stop_on_signals():
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt as exc:
                print(f"stopped: {stop_reason(exc)}", file=sys.stderr)
                return stop_code(exc)
    return wrapper


def failed(exc: BaseException, run_dir: Path, code: int = EXIT_FAILED) -> int:
    """Report a run that started and then failed, with what its folder keeps; ``code`` for ``main``."""
    what = stop_reason(exc) if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
    kept = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()) if run_dir.is_dir() else []
    keeps = (f"The run folder {run_dir} keeps {', '.join(kept)}" if kept else f"Nothing was kept in {run_dir}")
    unfinished = "" if "metrics.json" in kept else " (the run did not finish: no metrics.json or adapter/)"
    print(f"error: the run failed during training: {what}\n{keeps}{unfinished}.", file=sys.stderr)
    return code


def _check_path_length(target: Path, key: str) -> None:
    """A path whose one part is longer than the file system allows (255 bytes, NAME_MAX on Linux)
    or that is longer in all than PATH_MAX fails at its first use (``File name too long``)."""
    limit = 255  # checked before any part is looked at: stat() of a too-long name raises, not says "no"
    long = [part for part in target.parts if len(os.fsencode(part)) > limit]
    if long:
        raise ConfigError(f"{key}: the name {long[0][:40]!r}... is {len(os.fsencode(long[0]))} bytes, longer than "
                          f"the file system allows ({limit}); point {key} at a folder with shorter names")
    if len(os.fsencode(str(target))) >= 4096:
        raise ConfigError(f"{key}: the path is {len(os.fsencode(str(target)))} bytes, longer than the file system "
                          f"allows (4095); point {key} at a shorter path")


def check_writable_folder(path: str | Path, key: str) -> None:
    """Raise :class:`ConfigError` (naming ``key``) unless the folder ``path`` exists and can be written,
    or can be created; creates nothing.

    Walks up to the nearest existing path: it must be a folder (not a file) in which this process may
    create entries.  ``os.access`` is not enough as root (it says yes to everything on a writable
    mount), so the check makes and removes a temporary file there; on a read-only place such as
    ``/proc`` that fails as the real write would."""
    target = Path(path).expanduser().absolute()
    _check_path_length(target, key)
    existing = target
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # dangling: the folder cannot be made there, nor written through it
            raise ConfigError(f"{key}: {str(existing)!r} is a symbolic link to {os.readlink(existing)!r}, which does "
                              f"not exist; remove the link or make its target, or point {key} elsewhere")
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == target else f"lies under {str(existing)!r}, which is"
        raise ConfigError(f"{key}: {str(target)!r} {where} a file, not a folder; point {key} at a folder")
    reason = None
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "permission denied"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
    if reason is not None:
        where = "" if existing == target else f": no file can be created in its nearest existing folder {str(existing)!r}"
        raise ConfigError(f"{key}: cannot write to {str(target)!r}{where} ({reason}); point {key} at a "
                          f"folder this user can write")
