"""``--workers auto`` (dora_lab.study.workers.auto_workers): the decision rule, and the CLI's parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dora_lab.plan.setup import prepare
from dora_lab.studies import main
from dora_lab.study.workers import (
    CONTEXT_MIB,
    SAFETY,
    auto_workers,
    gpu_workers,
    probe_peak_mib,
    resolve_workers,
    worker_shares,
)
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides


@pytest.mark.parametrize(("cpus", "n_trials", "gpus", "processes", "threads", "expected"), [
    (2, 8, 0, 1, None, 2),      # this machine: 2 workers x 1 thread
    (16, 8, 0, 1, None, 8),     # never more workers than trials
    (16, None, 0, 1, None, 16),  # until the timeout: no cap
    (16, 40, 0, 1, 4, 4),       # OMP_NUM_THREADS=4: 16 / 4
    (16, 40, 0, 2, None, 8),    # train.processes 2: each trial takes two CPUs
    (1, 8, 0, 1, None, 1),
    (3, 8, 0, 1, 2, 1),         # 3 CPUs at 2 threads: one worker, never zero
    (64, 8, 1, 1, None, 1),     # a GPU: one worker (no packing)
])
def test_the_rule(cpus: int, n_trials: int | None, gpus: int, processes: int, threads: int | None,
                  expected: int) -> None:
    workers, why = auto_workers(cpus, n_trials, gpus, processes, threads)
    assert workers == expected
    assert why.startswith(f"{expected} worker")


def test_each_auto_worker_gets_an_even_share_of_the_cpus() -> None:
    assert auto_workers(8, None, 0)[1].startswith("8 worker(s) x 1 thread(s)")
    assert auto_workers(8, 2, 0)[1].startswith("2 worker(s) x 4 thread(s)")  # 2 trials: 4 threads each


def test_resolve_keeps_a_count_and_decides_auto(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_workers(3, 10, 1) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("dora_lab.study.workers.usable_cpus", lambda: 6)
    assert resolve_workers("auto", 4, 1) == 4
    assert "--workers auto: 4 worker(s) x 1 thread(s)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["two", "1.5", ""])
def test_a_bad_workers_value_is_refused_with_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["configs/cola.yaml", "--workers", value])
    assert exc.value.code == 2
    assert "neither a whole number nor 'auto'" in capsys.readouterr().err


# -- several trials on one GPU: the count from a probe trial's measured peak (issue 27) --------------------
@pytest.mark.parametrize(("peak", "free", "cpus", "n_trials", "expected"), [
    (1500.0, 79000.0, 16, None, 16),  # H100, MiniLM-sized trial: 79000 / (2250 + 512) = 28, capped at 16 CPUs
    (1500.0, 79000.0, 32, None, 28),  # more CPUs: the memory decides
    (1500.0, 79000.0, 32, 8, 8),      # never more workers than trials
    (30000.0, 79000.0, 16, None, 1),  # 79000 / 45512 = 1
    (20000.0, 79000.0, 16, None, 2),  # 79000 / 30512 = 2
    (60000.0, 79000.0, 16, None, 1),  # does not fit even once by the estimate: still one worker
])
def test_gpu_packing_rule(peak: float, free: float, cpus: int, n_trials: int | None, expected: int) -> None:
    workers, why = gpu_workers(peak, free, cpus, n_trials)
    assert workers == expected
    per = peak * SAFETY + CONTEXT_MIB  # the rule written out: free // (peak x safety + context), capped
    assert workers == max(1, min(int(free // per), cpus, n_trials or cpus))
    assert why.startswith(f"{expected} worker(s) on one GPU")


def test_auto_packs_only_one_gpu_with_a_measurement() -> None:
    assert auto_workers(16, None, 1, gpu_memory=(1500.0, 79000.0))[0] == 16
    assert auto_workers(16, None, 1)[0] == 1  # no measurement (the probe failed): one worker
    assert auto_workers(16, None, 2, gpu_memory=(1500.0, 79000.0))[0] == 1  # several GPUs: --workers N
    assert auto_workers(16, None, 1, processes=2, gpu_memory=(1500.0, 79000.0))[0] == 1  # a trial spans GPUs


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_probe_trial_measures_a_peak_and_auto_decides_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The probe is a real one-step run (here on the CPU, where its peak is the process's RSS); only the GPU's
    free memory, which needs CUDA, is given."""
    model_dir = make_tiny_model_dir(tmp_path / "bert")
    sets = [s for s in tiny_overrides(model_dir, tmp_path / "out") if not s.startswith("schedule.")]  # searched
    setup = prepare(REPO / "configs" / "cola.yaml", sets)
    peak = probe_peak_mib(setup)
    assert peak is not None and 50 < peak < 4000  # a Python process with torch and a tiny BERT: hundreds of MiB
    assert not (tmp_path / "out").exists()  # the probe's files went to a temporary folder
    monkeypatch.setattr("dora_lab.study.workers.visible_gpus", lambda: ["0"])
    monkeypatch.setattr("dora_lab.study.workers._free_gpu_mib", lambda: 40 * peak)
    monkeypatch.setattr("dora_lab.study.workers.usable_cpus", lambda: 64)
    workers = resolve_workers("auto", None, 1, setup)
    out = capsys.readouterr().out
    assert "worker(s) on one GPU" in out
    # the second probe's peak is within a few MiB of the first: the count is the rule's for about that peak
    assert abs(workers - int(40 * peak // (peak * SAFETY + CONTEXT_MIB))) <= 1, out


def test_a_failing_probe_means_one_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    setup = prepare(REPO / "configs" / "cola.yaml", [f"task.data_dir={tmp_path / 'missing'}", f"output_dir={tmp_path}"])
    monkeypatch.setattr("dora_lab.study.workers.visible_gpus", lambda: ["0"])
    assert resolve_workers("auto", 8, 1, setup) == 1
    captured = capsys.readouterr()
    assert "the probe trial failed (exit 2)" in captured.err
    assert "1 worker: 1 GPU(s) visible and no measured trial" in captured.out


@pytest.mark.parametrize(("n_trials", "workers", "grid_to_end", "expected"), [
    (20, 2, True, [None, None]),   # a grid to its end: each worker claims points until none is left
    (1, 2, True, [None]),          # one point left: one worker
    (None, 3, False, [None, None, None]),  # until the timeout
    (20, 2, False, [10, 10]),      # a counted study (TPE, or a grid with n_trials): even shares
    (5, 2, False, [3, 2]),
    (1, 3, False, [1]),            # no worker without a trial
])
def test_worker_shares(n_trials: int | None, workers: int, grid_to_end: bool, expected: list[int | None]) -> None:
    assert worker_shares(n_trials, workers, grid_to_end) == expected
