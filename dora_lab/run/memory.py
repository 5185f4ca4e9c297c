"""Peak memory of a run, for its metrics: the accelerator's allocator on CUDA, the process on a CPU.

- CUDA: ``torch.cuda.max_memory_allocated`` since :func:`reset_peak` (tensors only, not the
  allocator's cache or the CUDA context).
- CPU (and anything else): the process's peak resident set size (``resource.getrusage``,
  ``ru_maxrss``), which cannot be reset: it covers the whole process so far (Python, libraries, the
  data and the model included), so it is an upper bound of what training itself needed.
"""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["peak_memory_mb", "reset_peak"]


def reset_peak(device: torch.device) -> None:
    """Start counting the CUDA peak now (a no-op elsewhere: the process peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """``(peak in MiB, what was measured)``: ``cuda_max_allocated`` or ``process_max_rss``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_max_rss"
