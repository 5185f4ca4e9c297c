"""``--workers auto`` (dora_lab.study.workers.auto_workers): the decision rule, and the CLI's parsing."""

from __future__ import annotations

import pytest

from dora_lab.studies import main
from dora_lab.study.workers import auto_workers, resolve_workers


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
