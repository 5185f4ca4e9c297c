"""Per-run peak memory on a CPU: reset at the run's start, so a run after a big one reports its own peak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import numpy as np, torch
from dora_lab.run.memory import peak_memory_mb, reset_peak
cpu = torch.device("cpu")
reset_peak(cpu)
big = np.ones(400 * 2**20 // 8)  # 400 MiB touched: the first "trial"
first, source = peak_memory_mb(cpu)
del big
reset_peak(cpu)  # the next trial starts
small = np.ones(20 * 2**20 // 8)
second, _ = peak_memory_mb(cpu)
print(first, second, source)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_is_the_runs_own_not_the_processs_growing_peak() -> None:
    """A trial after a 400 MiB one reports about 380 MiB less (the old ru_maxrss peak could only grow,
    so both trials reported the 400 MiB one's peak)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    first, second, source = out.stdout.split()
    assert source == "process_peak_rss_since_reset"
    assert float(first) - float(second) > 350  # the 400 MiB array is not in the second peak
    assert float(second) > 20  # but the second trial's own 20 MiB (and the interpreter) are
