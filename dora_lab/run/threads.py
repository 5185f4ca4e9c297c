"""CPU threads that share the cores well: OpenMP's waiting, and threads per study worker.

torch's CPU kernels run their parallel regions on an OpenMP runtime: GNU libgomp in the PyPI CPU
wheels (``torch.__config__.parallel_info()`` says "ATen parallel backend: OpenMP"; MKL and oneDNN
use the same runtime), LLVM's or Intel's in some other builds.  By default an OpenMP thread that
has finished its share of a region spins for a while before it sleeps (libgomp: 300,000 spins,
about 3 ms), betting that the next region comes soon.  On an idle machine that bet pays.  Where
another process is busy on the same cores (a laptop, CI, a shared node) it does not: the thread
a region waits for has been descheduled, and the others spin meanwhile, taking the CPU it needs,
so training burns CPU time for nothing (the default study's first trial used 1,105 CPU-seconds
for 536 steps, about 240 on an idle machine; with 2 cores at a load average of 7-8,
``benchmarks/bench_threads.py`` measured 4.0 CPU-s and 10 s a MiniLM step spinning against
0.46 CPU-s and 0.9 s passive).  ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads
sleep at once; every OpenMP runtime reads it (Intel's and LLVM's also read ``KMP_BLOCKTIME``,
libgomp ``GOMP_SPINCOUNT``).  ``benchmarks/bench_threads.py`` measures what it saves and costs.

The runtime reads its environment once, when torch loads it.  So :func:`apply_env_defaults` runs
from ``dora_lab/__init__.py`` before anything there imports torch, which covers every
``python -m dora_lab.*`` command and a script or notebook that imports dora_lab first; where
torch was imported already it does nothing (the runtime has started; changing the environment
would only surprise this process's children).  A value the user set for any of the waiting
variables is kept, and then dora_lab adds nothing: ``GOMP_SPINCOUNT=300000`` brings back torch's
default spinning (libgomp), ``OMP_WAIT_POLICY=ACTIVE`` spins without end.

The number of threads is torch's own choice (one per usable core; set ``OMP_NUM_THREADS`` to
change it), except in a study's ``--workers`` processes, which split the usable cores between
them (:func:`worker_threads`).  This module must not import torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

__all__ = ["ENV_DEFAULTS", "WAIT_KEYS", "apply_env_defaults", "env_defaults", "usable_cpus", "worker_env",
           "worker_threads"]

ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
# Any of these set means the user chose how OpenMP threads wait; dora_lab then adds nothing.
WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def env_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables dora_lab would add to ``environ``: none where the user chose the waiting."""
    if any(key in environ for key in WAIT_KEYS):
        return {}
    return dict(ENV_DEFAULTS)


def apply_env_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Add :data:`ENV_DEFAULTS` to ``environ`` (default ``os.environ``) unless the user set a
    waiting variable or (for ``os.environ``) torch is already imported; returns what was added."""
    if environ is None:
        if "torch" in sys.modules:
            return {}
        environ = os.environ
    added = env_defaults(environ)
    environ.update(added)
    return added


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_threads(workers: int, environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """Threads for each of ``workers`` processes on this machine: the user's ``OMP_NUM_THREADS``
    where set to a positive integer, else the usable CPUs (or ``cpus``) split evenly (at least one)."""
    environ = os.environ if environ is None else environ
    user = environ.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 0:
        return int(user)
    return max(1, (cpus or usable_cpus()) // max(1, workers))


def worker_env(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker process: ``environ`` (default ``os.environ``) with the waiting
    defaults (unless the user chose) and ``OMP_NUM_THREADS=threads``."""
    environ = os.environ if environ is None else environ
    return {**environ, **env_defaults(environ), "OMP_NUM_THREADS": str(threads)}
