"""How the command-line tools end when something is wrong: one paragraph on stderr, no traceback.

The exit codes are shared by ``dora_lab.train``, ``dora_lab.study`` and ``dora_lab.export``:

- 2 (:func:`refuse`): bad input found before any work (a config key, a data file, a model name, an
  output folder that cannot be written); nothing was started or stored.
- 1 (:func:`failed`): the work started and then failed (a diverging loss, a scorer that returns NaN);
  the message says what the run folder keeps.
- 130: stopped by Ctrl-C (SIGINT); 143: stopped by SIGTERM (what ``timeout``, Slurm, Kubernetes and
  schedulers send).

One mechanism stops a run on either signal: :func:`stop_on_sigterm` makes SIGTERM raise
:class:`Terminated`, a :class:`KeyboardInterrupt`, in the main thread, so every ``except
KeyboardInterrupt`` (the trial recorded FAIL, runs closed, the summary written, workers stopped) runs
for both; :func:`stop_reason` and :func:`stop_code` tell them apart in the messages and exit codes.

:data:`INPUT_ERRORS` are the exceptions that mean "bad input": their messages already name the key,
file or row and the fix.  :func:`check_writable_folder` is the output-folder check made before work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import ParamSpec

from ..core.registry import RegistryError
from .config_yaml import ConfigError
from .models import ModelLoadError
from .rows import DataError

__all__ = ["EXIT_FAILED", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "INPUT_ERRORS", "Terminated",
           "check_writable_folder", "failed", "refuse", "stop_code", "stop_on_sigterm", "stop_reason",
           "stoppable"]

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
    """SIGTERM arrived (raised by :func:`stop_on_sigterm`'s handler): handled wherever Ctrl-C is."""


def stop_reason(exc: KeyboardInterrupt) -> str:
    """The ``fail_reason`` of a trial or run stopped by ``exc``: ``terminated (SIGTERM)`` or
    ``interrupted (KeyboardInterrupt / Ctrl-C)``.  Both mean "not the trial's fault" (a grid point
    stopped this way runs again)."""
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (KeyboardInterrupt / Ctrl-C)"


def stop_code(exc: KeyboardInterrupt) -> int:
    """The exit code after stopping on ``exc``: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` in the main thread, once; further SIGTERMs
    (a scheduler that signals every process of the job, then the parent forwarding it) are ignored
    so they cannot cut the clean-up short (SIGKILL still ends the process).  The previous handler is
    restored on leaving.  Outside the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


P = ParamSpec("P")


def stoppable(main: Callable[P, int]) -> Callable[P, int]:
    """A CLI's ``main`` with SIGTERM handled as Ctrl-C (:func:`stop_on_sigterm`).  A stop that ``main``
    does not handle itself (one during start-up, before any work is stored) ends in one line and
    its exit code (130 or 143) instead of a traceback."""
    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        with stop_on_sigterm():
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
