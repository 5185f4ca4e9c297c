"""A run's folder: the files a run writes there (:data:`RUN_FILES`), and claiming the folder for a new
run without ever mixing it with an old one's (:func:`check_run_dir`, :func:`claim_run_dir`)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["RUN_FILES", "RunDirExists", "check_run_dir", "claim_run_dir"]


class RunDirExists(FileExistsError):
    """The run folder already holds a run's files; nothing was written."""


# every file and folder train_run writes into its run folder (plots/: the tracker's pictures)
RUN_FILES = ("config.yaml", "metrics.json", "allocation.json", "scores.json", "budget.json", "adapter", "plots")


def check_run_dir(run_dir: Path, overwrite: bool = False) -> list[Path]:
    """The files of a run already in ``run_dir`` (to be removed with ``overwrite``); without
    ``overwrite`` a folder holding a run raises :class:`RunDirExists`.  Creates nothing."""
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if old and not overwrite:
        raise RunDirExists(f"run folder {str(run_dir)!r} already holds a run ({', '.join(p.name for p in old)}); "
                           "choose another folder, or pass --overwrite to replace that run")
    return old


def claim_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Make ``run_dir`` ready for a new run (:func:`check_run_dir`; with ``overwrite`` exactly the old
    run's files are removed, other files in the folder stay): a new run never sits beside an old run's
    adapter or metrics."""
    for path in check_run_dir(run_dir, overwrite):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
