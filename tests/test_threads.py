"""OpenMP settings for shared cores (dora_lab/threads.py): the defaults reach the OpenMP runtime
of a ``python -m dora_lab.*`` command and of a study's worker processes, and a user's value wins.

The subprocess tests ask libgomp itself (``OMP_DISPLAY_ENV=VERBOSE`` makes it print the settings
it took when torch loaded it), so they check that the default was in place before torch started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import dora_lab.study.workers as study_workers
from dora_lab.run import threads

REPO = Path(__file__).resolve().parents[1]
OMP_KEYS = (*threads.WAIT_KEYS, "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **extra}


def test_defaults_are_added_only_where_the_user_chose_nothing() -> None:
    assert threads.env_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    for key, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "10000"), ("KMP_BLOCKTIME", "200")):
        assert threads.env_defaults({key: value}) == {}
    environ = {"HOME": "/x"}
    assert threads.apply_env_defaults(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"HOME": "/x", "OMP_WAIT_POLICY": "PASSIVE"}
    user = {"OMP_WAIT_POLICY": "active"}
    assert threads.apply_env_defaults(user) == {} and user == {"OMP_WAIT_POLICY": "active"}


def test_nothing_changes_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401  (conftest imported it already; the runtime has read its settings)

    for key in OMP_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert threads.apply_env_defaults() == {}
    assert "OMP_WAIT_POLICY" not in os.environ


# libgomp reports the spin count it took from the wait policy: 300000 unset, 0 passive, 3e10 active
@pytest.mark.parametrize(("user", "spins"), [(None, "0"), ("ACTIVE", "30000000000")])
def test_the_cli_starts_openmp_with_the_default_or_the_users_value(user: str | None, spins: str) -> None:
    extra = {"OMP_DISPLAY_ENV": "VERBOSE", **({"OMP_WAIT_POLICY": user} if user else {})}
    proc = subprocess.run([sys.executable, "-m", "dora_lab.train", "--help"], cwd=REPO, env=clean_env(**extra),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: python -m dora_lab.train" in proc.stdout
    if "GOMP_SPINCOUNT = " not in proc.stderr:
        pytest.skip("torch here does not run on GNU libgomp (the PyPI CPU wheels do)")
    assert f"GOMP_SPINCOUNT = '{spins}'" in proc.stderr, proc.stderr[-2000:]


def test_worker_threads_split_the_usable_cpus_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert [threads.worker_threads(w, {}) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert threads.worker_threads(2, {"OMP_NUM_THREADS": "3"}) == 3
    assert threads.worker_threads(2, {"OMP_NUM_THREADS": "0"}) == 4  # not a usable count: ignored
    assert threads.worker_threads(2, {"OMP_NUM_THREADS": "4,2"}) == 4  # nested-levels syntax: ignored


def test_usable_cpus_follow_the_affinity_mask() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.usable_cpus() == expected


def test_study_workers_get_the_defaults_and_a_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--workers 2``: both worker processes start with the waiting default and half the CPUs."""
    for key in OMP_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 6)
    started: list[dict[str, Any]] = []

    class FakePopen:
        returncode = 0

        def __init__(self, cmd: list[str], env: dict[str, str], **kw: Any) -> None:
            started.append({"cmd": cmd, "env": env})

        def wait(self, timeout: float | None = None) -> int:
            return 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(study_workers.subprocess, "Popen", FakePopen)
    setup = SimpleNamespace(config_path=Path("configs/cola.yaml"), overrides=[],
                            base=SimpleNamespace(train=SimpleNamespace(processes=1)),
                            study=SimpleNamespace(sampler=SimpleNamespace(name="tpe"), n_trials=4))
    assert study_workers.run_workers(setup, 4, 2, "parent") == (None, False)  # type: ignore[arg-type]
    assert len(started) == 2
    for s in started:
        assert s["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and s["env"]["OMP_NUM_THREADS"] == "3"
        assert s["cmd"][s["cmd"].index("--threads") + 1] == "3"

    started.clear()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study_workers.run_workers(setup, 4, 2, "parent")  # type: ignore[arg-type]
    assert all(s["env"]["OMP_WAIT_POLICY"] == "ACTIVE" and s["env"]["OMP_NUM_THREADS"] == "1" for s in started)
