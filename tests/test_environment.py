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
from dora_lab.report.io import ENV_COLUMNS, Run
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
    assert saved == result.environment and list(saved) == list(KEYS) and set(ENV_COLUMNS) == set(KEYS)
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
    unknown, note = environment_notes(groups, list(groups), ["method.name"])
    assert note.startswith("runs ran in more than one environment (device differ)")
    assert note.endswith("By group: sora: device Xeon A; dora: device Xeon B")
    assert unknown.startswith("environment unknown for some runs (dora: 1 of 2)")
    same = {("sora",): [_run(0, "sora", here)], ("dora",): [_run(0, "dora", here), _run(1, "dora", here)]}
    assert environment_notes(same, list(same), ["method.name"]) == []
    # a run without one is not a difference, but it is named: it may have run anywhere
    some = {("sora",): [_run(0, "sora", here)], ("dora",): [_run(0, "dora", {}), _run(1, "dora", here)]}
    (only,) = environment_notes(some, list(some), ["method.name"])
    assert only.startswith("environment unknown for some runs (dora: 1 of 2)")
    none = {("sora",): [_run(0, "sora", {})], ("dora",): [_run(0, "dora", {})]}
    assert environment_notes(none, list(none), ["method.name"]) == []  # none recorded: nothing to compare


_TRAIN_IN_A_PROCESS = """
import sys
from pathlib import Path
from dora_lab.run.config import load_config
from dora_lab.run.train import train_run
from tests.tiny import REPO, tiny_overrides
tmp, model = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(REPO / "configs" / "cola.yaml", [*tiny_overrides(model, tmp, train=64), "method.name=sora",
                  "method.params={}", "train.max_steps=8", "train.eval_every=4"])
train_run(cfg, tmp / "run", progress=False)
"""


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_one_machine_gives_the_same_weights_in_every_process(tmp_path: Path) -> None:
    """The claim the environment record rests on: on one machine a run is a function of its config
    and seed, whatever process runs it (another PYTHONHASHSEED, another memory layout).  sora, whose
    gate draws and thresholds would show any order dependence, trained in two fresh processes."""
    import os
    import sys

    from safetensors.torch import load_file

    model = make_tiny_model_dir(tmp_path / "bert")
    weights = []
    for hash_seed in ("1", "2"):
        folder = tmp_path / f"p{hash_seed}"
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", _TRAIN_IN_A_PROCESS, str(folder), str(model)], cwd=REPO, env=env,
                       check=True, capture_output=True, timeout=600)
        weights.append(load_file(folder / "run" / "adapter" / "adapter.safetensors"))
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key  # bit for bit (the file's metadata holds minutes)
