"""``--workers N``: N worker processes (the study CLI with ``--worker``) on one storage.

This invocation's trials are split between the workers; each runs :func:`dora_lab.study.runner.optimize`
on the shared storage, so grid points are claimed once (:mod:`dora_lab.study.grid`) and every
trial logs under the one MLflow parent run passed to it.  Each worker gets its share of the CPU
threads (:func:`~dora_lab.run.threads.worker_threads`) and, with ``train.processes: N`` per trial, its
own N GPUs when the machine has W x N (:func:`~dora_lab.run.distributed.gpu_groups`; else they share
them).  Ctrl-C or SIGTERM stops every worker exactly once, with the same signal (they run in their
own sessions); their running trials are recorded FAIL.

``--workers auto`` picks the count by :func:`auto_workers`'s rule (docs/throughput.md): on the CPU one
worker per usable CPU (``OMP_NUM_THREADS`` threads each where set, else one), never more workers than
trials; on a GPU one worker (packing trials on one GPU is not built).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from ..run.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, stop_reason
from ..run.distributed import gpu_groups, visible_gpus
from ..run.threads import usable_cpus, worker_env, worker_threads

if TYPE_CHECKING:
    from ..plan.setup import StudySetup

__all__ = ["auto_workers", "resolve_workers", "run_workers", "worker_command", "workers_arg"]


def auto_workers(cpus: int, n_trials: int | None, gpus: int, processes: int = 1,
                 threads: int | None = None) -> tuple[int, str]:
    """``--workers auto``: how many workers, and why in one line.

    On the CPU, workers x threads fill the usable CPUs with one thread per worker (``threads``, the
    user's ``OMP_NUM_THREADS``, where set), each trial's ``processes`` counted: bench_threads measured a
    MiniLM step at 0.36 CPU-s on one thread against 0.43 on two, so separate trials use a core better
    than threads of one trial, and trials are independent.  Never more workers than ``n_trials``
    (``None``: until the timeout, no cap).  With ``gpus``, one worker: several trials on one GPU are
    not built here, and a worker per GPU group needs ``--workers N`` as before.
    """
    if gpus:
        return 1, f"1 worker: a GPU is visible ({gpus}), and trials are not packed on one GPU"
    per = max(1, threads or 1) * max(1, processes)
    workers = max(1, cpus // per)
    why = f"{cpus} usable CPU(s) / ({threads or 1} thread(s) x {processes} process(es) per trial)"
    if n_trials is not None and 0 < n_trials < workers:
        workers, why = n_trials, f"{why}, capped at the {n_trials} trial(s) to run"
    return workers, f"{workers} worker(s) x {worker_threads(workers, _threads_env(threads), cpus)} thread(s): {why}"


def _threads_env(threads: int | None) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


def resolve_workers(workers: int | str, n_trials: int | None, processes: int) -> int:
    """``--workers``'s value as a count; ``auto`` decided by :func:`auto_workers` and printed."""
    if workers != "auto":
        return int(workers)
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(user) if user.isdigit() and int(user) > 0 else None
    count, why = auto_workers(usable_cpus(), n_trials, len(visible_gpus()), processes, threads)
    print(f"--workers auto: {why}", flush=True)
    return count


def worker_command(setup: StudySetup, n: int | None, parent_id: str, threads: int, index: int) -> list[str]:
    """The command line of worker ``index`` (0-based), running ``n`` trials (``None``: no limit)."""
    cmd = [sys.executable, "-m", "dora_lab.study", str(setup.config_path)]
    for item in setup.overrides:
        cmd += ["--set", item]
    cmd += ["--worker", str(index + 1), "--parent-run-id", parent_id, "--threads", str(threads)]
    return cmd + (["--n-trials", str(n)] if n is not None else [])


def run_workers(setup: StudySetup, n_trials: int | None, workers: int, parent_id: str
                ) -> tuple[KeyboardInterrupt | None, bool]:
    """Start the workers, wait for them; ``(what stopped them: Ctrl-C or SIGTERM, or None; a worker failed)``."""
    shares: list[int | None] = [None] * workers if n_trials is None else [
        n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    shares = [s for s in shares if s != 0]
    threads = worker_threads(len(shares))
    env = worker_env(threads)
    # each worker its own GPUs when there are enough for all (train.processes per trial)
    gpus = gpu_groups(visible_gpus(), len(shares), setup.base.train.processes)
    # Own sessions: a Ctrl-C reaches this process only, which then stops each worker exactly once.
    procs = [subprocess.Popen(worker_command(setup, n, parent_id, threads, i), start_new_session=True,
                              env=env if g is None else {**env, "CUDA_VISIBLE_DEVICES": g})
             for i, (n, g) in enumerate(zip(shares, gpus, strict=True))]
    stop: KeyboardInterrupt | None = None
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (dora_lab.run.cli.stoppable): passed on as it came
        stop = exc
        sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print(f"\n{stop_reason(exc)}: stopping the workers (their running trials are recorded as FAIL) ...",
              file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    stopped = (0, EXIT_INTERRUPTED, EXIT_TERMINATED, -signal.SIGINT, -signal.SIGTERM)
    bad = [p.returncode for p in procs if p.returncode not in stopped]
    if bad:
        print(f"error: {len(bad)} worker(s) exited with codes {bad}; their output is above", file=sys.stderr)
    return stop, bool(bad)


def workers_arg(value: str) -> int | str:
    """``--workers``: ``auto`` or a whole number (checked by :func:`run_study`)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a whole number nor 'auto'; "
                                         "write e.g. --workers 2 or --workers auto") from None
