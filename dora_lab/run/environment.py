"""What a run ran on, written into its ``metrics.json`` (``"environment"``) and onto its MLflow run
(``dora_lab.env.*`` tags), so a number can be traced to the code, the libraries and the hardware
that made it.

Training is deterministic for a seed on one machine, but not across machines: the same config and
seed on another CPU (other vector kernels) or another torch build can end at another dev metric
(docs/results.md measured it: sora's CoLA seeds 0-7, rerun on a fresh machine, moved by up to
0.03 MCC).  A report over runs from several environments says so (:func:`differences`).
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..core.version import __version__

__all__ = ["KEYS", "differences", "distinct", "environment", "source_commit"]

KEYS = ("dora_lab", "commit", "python", "torch", "transformers", "device", "cpu_capability", "threads")
"""The keys of :func:`environment`, in its order."""


@cache
def source_commit() -> str | None:
    """The git commit of the checkout this ``dora_lab`` is imported from (``None`` for an installed
    copy outside a checkout, or without git; an installed copy inside another repository's work tree
    is untracked there, so it names no commit).  Uncommitted changes are not in it."""
    here = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=here,
                                 capture_output=True, timeout=10).returncode == 0
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git here
        return None
    return head.stdout.strip() if tracked and head.returncode == 0 else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def environment(device: torch.device) -> dict[str, Any]:
    """The run's environment: dora_lab's version and commit, Python, torch and transformers versions,
    the device's name (the CPU model, or the GPU's), the CPU vector kernels torch dispatches to
    (``cpu_capability``, e.g. ``AVX512``) and torch's intra-op threads."""
    import transformers

    return {"dora_lab": __version__, "commit": source_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": _device_name(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def distinct(environments: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """The distinct values of ``key`` among ``environments``, in first-seen order (runs without an
    environment, from before dora_lab recorded one, and runs read back from a report that lacks the key
    are left out)."""
    seen: list[Any] = []
    for env in environments:
        if key in env and env[key] not in seen:
            seen.append(env.get(key))
    return seen


def differences(environments: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The environment keys whose values differ among ``environments``, each with its distinct values
    (:func:`distinct`); ``commit`` is left out (a study's runs span commits that did not touch
    training as a rule; each run's own commit is in its files)."""
    return {k: v for k in KEYS if k != "commit" and len(v := distinct(environments, k)) > 1}
