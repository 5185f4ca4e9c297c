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
trials; on one GPU as many workers as fit its free memory by a probe trial's measured peak
(:func:`gpu_workers`, :func:`probe_peak_mib`), never more than the usable CPUs; on several GPUs one
worker (``--workers N`` gives each worker its own GPU group).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..run.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, stop_reason
from ..run.distributed import gpu_groups, visible_gpus
from ..run.threads import usable_cpus, worker_env, worker_threads

if TYPE_CHECKING:
    from ..plan.setup import StudySetup

__all__ = ["auto_workers", "gpu_workers", "probe_command", "probe_peak_mib", "resolve_workers", "run_workers",
           "worker_command", "worker_shares", "workers_arg"]

#: One more trial on a GPU costs its measured peak (``torch.cuda.max_memory_allocated`` of the probe) times
#: SAFETY (the caching allocator's slack and fragmentation over what tensors hold, batches longer than the
#: probe's, a searched start rank above the base config's) plus CONTEXT_MIB (each process's CUDA context and
#: kernels, which the allocator does not count).
SAFETY = 1.5
CONTEXT_MIB = 512.0


def gpu_workers(peak_mib: float, free_mib: float, cpus: int, n_trials: int | None,
                safety: float = SAFETY, context_mib: float = CONTEXT_MIB) -> tuple[int, str]:
    """Workers that share one GPU: as many as ``free_mib`` holds at ``peak_mib * safety + context_mib``
    each, at most one per usable CPU (each worker's Python, data loading and kernel launches need a
    core) and never more than ``n_trials``; at least one.  With the reason in one line."""
    per = peak_mib * safety + context_mib
    fit = int(free_mib // per)
    workers = max(1, min(fit, cpus))
    why = (f"{free_mib:.0f} MiB free on the GPU / ({peak_mib:.0f} MiB measured peak x {safety:g} + "
           f"{context_mib:.0f} MiB context) = {fit}")
    why += f", capped at the {cpus} usable CPU(s)" if fit > cpus else ""
    why += ": not even one by this estimate, so one" if fit < 1 else ""
    if n_trials is not None and 0 < n_trials < workers:
        workers, why = n_trials, f"{why}, capped at the {n_trials} trial(s) to run"
    return workers, f"{workers} worker(s) on one GPU: {why}"


def auto_workers(cpus: int, n_trials: int | None, gpus: int, processes: int = 1,
                 threads: int | None = None, gpu_memory: tuple[float, float] | None = None) -> tuple[int, str]:
    """``--workers auto``: how many workers, and why in one line.

    On the CPU, workers x threads fill the usable CPUs with one thread per worker (``threads``, the
    user's ``OMP_NUM_THREADS``, where set), each trial's ``processes`` counted: bench_threads measured a
    MiniLM step at 0.36 CPU-s on one thread against 0.43 on two, so separate trials use a core better
    than threads of one trial, and trials are independent.  Never more workers than ``n_trials``
    (``None``: until the timeout, no cap).  With one GPU and ``gpu_memory`` (a probe trial's peak MiB,
    the GPU's free MiB): :func:`gpu_workers`.  Otherwise with ``gpus``, one worker: a worker per GPU
    group needs ``--workers N`` as before.
    """
    if gpus == 1 and processes == 1 and gpu_memory is not None:
        return gpu_workers(*gpu_memory, cpus, n_trials)
    if gpus:
        return 1, f"1 worker: {gpus} GPU(s) visible and no measured trial to pack on one (give --workers N)"
    per = max(1, threads or 1) * max(1, processes)
    workers = max(1, cpus // per)
    why = f"{cpus} usable CPU(s) / ({threads or 1} thread(s) x {processes} process(es) per trial)"
    if n_trials is not None and 0 < n_trials < workers:
        workers, why = n_trials, f"{why}, capped at the {n_trials} trial(s) to run"
    return workers, f"{workers} worker(s) x {worker_threads(workers, _threads_env(threads), cpus)} thread(s): {why}"


def _threads_env(threads: int | None) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


def resolve_workers(workers: int | str, n_trials: int | None, processes: int,
                    setup: StudySetup | None = None) -> int:
    """``--workers``'s value as a count; ``auto`` decided by :func:`auto_workers` and printed.  With one
    GPU (and trials on it: ``model.device`` not ``cpu``), ``setup``'s probe trial is measured first."""
    if workers != "auto":
        return int(workers)
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(user) if user.isdigit() and int(user) > 0 else None
    gpus = len(visible_gpus()) if setup is None or setup.base.model.device != "cpu" else 0
    memory = None
    if gpus == 1 and processes == 1 and setup is not None:
        print("--workers auto: measuring one probe trial's peak GPU memory ...", flush=True)
        peak = probe_peak_mib(setup)
        memory = None if peak is None else (peak, _free_gpu_mib())
    count, why = auto_workers(usable_cpus(), n_trials, gpus, processes, threads, memory)
    print(f"--workers auto: {why}", flush=True)
    return count


def probe_command(setup: StudySetup, run_dir: Path) -> list[str]:
    """The probe trial: ``python -m dora_lab.train`` on the study's config and ``--set`` values, one optimizer
    step of the ``dora`` method (the adapter every method trains; no schedule to fit one step) and one
    evaluation batch, its files in ``run_dir`` only (no adapter saved)."""
    cmd = [sys.executable, "-m", "dora_lab.train", str(setup.config_path)]
    probe = ["train.max_steps=1", "method.name=dora", "method.params={}", "schedule.name=constant",
             "eval.at_start=false", "train.save_adapter=false", f"output_dir={run_dir}",
             f"task.max_eval_samples={setup.base.train.eval_batch_size}"]
    for item in [*setup.overrides, *probe]:
        cmd += ["--set", item]
    return cmd + ["--run-dir", str(run_dir / "probe")]


def probe_peak_mib(setup: StudySetup) -> float | None:
    """The probe trial's peak memory in MiB (metrics.json's ``peak_memory_mb``: ``torch.cuda.max_memory_allocated``
    on a GPU, the process's peak RSS on a CPU), run as its own process so that this one holds no CUDA
    context; ``None`` (said on stderr) when the probe fails."""
    with tempfile.TemporaryDirectory(prefix="dora_lab_probe_") as tmp:
        done = subprocess.run(probe_command(setup, Path(tmp)), capture_output=True, text=True)
        metrics = Path(tmp) / "probe" / "metrics.json"
        if done.returncode != 0 or not metrics.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            print(f"--workers auto: the probe trial failed (exit {done.returncode}); one worker:\n{tail}", file=sys.stderr)
            return None
        return float(json.loads(metrics.read_text())["peak_memory_mb"])


def _free_gpu_mib() -> float:
    """Free memory of the (one) visible GPU, in MiB, as the driver reports it."""
    import torch

    return torch.cuda.mem_get_info()[0] / 2**20


def worker_command(setup: StudySetup, n: int | None, parent_id: str, threads: int, index: int) -> list[str]:
    """The command line of worker ``index`` (0-based), running ``n`` trials (``None``: no limit)."""
    cmd = [sys.executable, "-m", "dora_lab.study", str(setup.config_path)]
    for item in setup.overrides:
        cmd += ["--set", item]
    cmd += ["--worker", str(index + 1), "--parent-run-id", parent_id, "--threads", str(threads)]
    return cmd + (["--n-trials", str(n)] if n is not None else [])


def worker_shares(n_trials: int | None, workers: int, grid_to_end: bool) -> list[int | None]:
    """Each worker's trial count (``None``: no count).  A grid run to its end gives none: every worker
    claims points until no point is left (:func:`~dora_lab.study.grid.claim_grid_point`), so a worker
    that drew short trials takes more of them.  Fixed shares left one of two workers idle while the
    other ran its last three trials (12 minutes of a 75-minute methods ablation).  Otherwise the
    ``n_trials`` split as evenly as it goes, no worker without one."""
    if n_trials is None or grid_to_end:
        return [None] * (workers if n_trials is None else max(1, min(workers, n_trials)))
    return [n for n in (n_trials // workers + (i < n_trials % workers) for i in range(workers)) if n]


def run_workers(setup: StudySetup, n_trials: int | None, workers: int, parent_id: str
                ) -> tuple[KeyboardInterrupt | None, bool]:
    """Start the workers, wait for them; ``(what stopped them: Ctrl-C or SIGTERM, or None; a worker failed)``."""
    shares = worker_shares(n_trials, workers, setup.study.sampler.name == "grid" and setup.study.n_trials is None)
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
