"""Peak memory of a run, for its metrics: the accelerator's allocator on CUDA, the process on a CPU.

- CUDA: ``torch.cuda.max_memory_allocated`` since :func:`reset_peak` (tensors only, not the
  allocator's cache or the CUDA context).
- CPU on Linux: the process's peak resident set size since :func:`reset_peak` (``VmHWM`` in
  ``/proc/self/status``, which writing ``5`` to ``/proc/self/clear_refs`` resets to the current
  RSS).  So each trial of a study that runs many trials in one process gets its own peak, not the
  process's peak so far (which only grows, trial after trial).  It still counts everything resident
  (Python, libraries, the model and the data), so it is an upper bound of what training needed.
- Elsewhere (no ``/proc``, or a kernel that refuses the reset): the process's peak since it started
  (``resource.getrusage``, ``ru_maxrss``), named ``process_max_rss`` so that it is not mistaken for
  a per-run peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = ["peak_memory_mb", "reset_peak"]

_PROC = Path("/proc/self")
_reset_ok = False  # did the last reset_peak reset the kernel's peak RSS of this process?


def reset_peak(device: torch.device) -> None:
    """Start counting the peak now: the CUDA allocator's, or on Linux the process's peak RSS."""
    global _reset_ok
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        (_PROC / "clear_refs").write_text("5")  # "reset the peak resident set size" (proc(5))
        _reset_ok = _rss_kib("VmHWM") is not None
    except OSError:
        _reset_ok = False


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """``(peak in MiB, what was measured)``: ``cuda_max_allocated``, ``process_peak_rss_since_reset``
    (this run's peak: see the module's docstring) or ``process_max_rss`` (the process's whole life)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    hwm = _rss_kib("VmHWM") if _reset_ok else None
    if hwm is not None:
        return hwm / 2**10, "process_peak_rss_since_reset"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_max_rss"


def _rss_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``), or None without ``/proc``."""
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
