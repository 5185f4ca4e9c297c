"""What a run ran on (dora_lab.run.environment): recorded by a tiny real run, compared across runs,
and named by a report whose runs ran in more than one environment."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from dora_lab import __version__
from dora_lab.report.compare import environment_notes
from dora_lab.report.io import Run
from dora_lab.run.config import load_config
from dora_lab.run.environment import KEYS, differences, distinct, environment, source_commit
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides


def _cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_a_run_records_its_environment(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "bert")
    cfg = load_config(REPO / "configs" / "cola.yaml", [*tiny_overrides(model, tmp_path, train=32),
                                                        "train.max_steps=2", "train.eval_every=2"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["environment"]
    assert saved == result.environment and list(saved) == list(KEYS)
    assert saved["dora_lab"] == __version__ and saved["torch"] == torch.__version__
    assert saved["transformers"] == transformers.__version__ and saved["python"] == platform.python_version()
    assert saved["threads"] == torch.get_num_threads() >= 1
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["device"] == (_cpu_model() or platform.processor() or platform.machine())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a checkout: its commit
        assert saved["commit"] == head.stdout.strip() == source_commit()


def test_differences_name_only_what_differs() -> None:
    a = {"dora_lab": "0.1.0", "commit": "aaa", "python": "3.11.7", "torch": "2.13.0+cpu",
         "transformers": "5.25.0", "device": "Xeon A", "cpu_capability": "AVX512", "threads": 1}
    b = {**a, "commit": "bbb", "device": "Xeon B", "cpu_capability": "AVX2"}
    assert differences([a, a]) == {}
    assert differences([a, b, {}]) == {"device": ["Xeon A", "Xeon B"], "cpu_capability": ["AVX512", "AVX2"]}
    assert differences([a, {**a, "commit": "ccc"}]) == {}  # a commit alone is not a different machine
    assert distinct([{}, b, a, b], "device") == ["Xeon B", "Xeon A"]  # first seen first; {} left out
    assert environment(torch.device("cpu"))["device"] == (_cpu_model() or platform.processor() or platform.machine())


def _run(seed: int, method: str, env: dict[str, object]) -> Run:
    return Run(study="s", trial=seed, seed=seed, value=0.1, config={"method.name": method},
               metrics={"environment": env} if env else {})


def test_a_report_over_two_machines_says_which_group_ran_where() -> None:
    here = {"torch": "2.13.0+cpu", "device": "Xeon A", "cpu_capability": "AVX512"}
    there = {**here, "device": "Xeon B"}
    groups = {("sora",): [_run(0, "sora", here), _run(1, "sora", here)],
              ("dora",): [_run(0, "dora", there), _run(1, "dora", {})]}
    (note,) = environment_notes(groups, list(groups), ["method.name"])
    assert note.startswith("runs ran in more than one environment (device differ)")
    assert note.endswith("By group: sora: device Xeon A; dora: device Xeon B")
    same = {("sora",): [_run(0, "sora", here)], ("dora",): [_run(0, "dora", here), _run(1, "dora", {})]}
    assert environment_notes(same, list(same), ["method.name"]) == []  # a run without one is not a difference
