"""The device a benchmark runs on (``--device cpu|cuda`` of bench_speed and bench_study): the refusal
of ``cuda`` where torch sees no GPU, the GPU's description, and the host-device synchronisation put
around every timed block on a GPU (CUDA runs kernels asynchronously: without it a timer measures the
launches, not the work).  Imports torch only, so that a refusal comes before any heavy import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def cuda_refusal(device: str) -> str | None:
    """Why ``--device`` cannot be used here (for :func:`dora_lab.run.cli.refuse`: exit 2 before any
    work), or None.  Only ``cuda`` can be refused: when torch sees no CUDA device."""
    if device != "cuda" or torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
    return (f"--device cuda: torch.cuda.is_available() is False on this machine ({build}); run with "
            f"--device cpu here, or on a machine with an NVIDIA GPU and a CUDA build of torch "
            f"(benchmarks/gpu_session.sh, docs/throughput.md)")


def gpu_info() -> dict[str, Any]:
    """The GPU that ``cuda`` means: its name, memory and CUDA version (initialises CUDA in this process)."""
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_mib": props.total_memory / 2**20, "cuda": torch.version.cuda,
            "count": torch.cuda.device_count()}


def _nothing() -> None:
    return None


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call before reading a timer: ``torch.cuda.synchronize`` on a GPU, nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else _nothing
