"""Data-parallel runs on the CPU: real ``torchrun`` processes talking over gloo, no mocks.

Two processes with ``train.batch_size=b`` train on the halves of the global batches of ``2b`` rows
that one process with ``train.batch_size=2b`` trains on; with no dropout the two runs must take
the same pruning decisions and end with the same adapter (up to float rounding).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dora_lab.export.checkpoint import load_adapter
from dora_lab.run.config import load_config
from dora_lab.run.data import load_splits
from dora_lab.run.tasks import get_task
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, make_tiny_model_dir, tiny_overrides

pytestmark = [
    pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed"),
]

CONFIG = str(REPO / "configs" / "cola.yaml")
TIMEOUT = 180  # seconds: far above the ~30 s these take, far below a hang's


def _env() -> dict[str, str]:
    # the children import this checkout, one thread each (two ranks on two shared cores)
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _overrides(model_dir: Path, out: Path, batch: int) -> list[str]:
    return [*tiny_overrides(model_dir, out, train=64, evals=32), "adapter.dropout=0.0", "scorer.name=sensitivity",
            f"train.batch_size={batch}", "train.grad_accum=2", "train.epochs=2", "train.eval_every=2",
            "schedule.interval=1", "schedule.warmup=1", "schedule.final=0.5"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _logits(adapter: Path, model_dir: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_splits(get_task("cola"), COLA, max_train_samples=8, max_eval_samples=16)["validation"]
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    model = load_adapter(adapter, base_model=str(model_dir)).eval()
    with torch.no_grad():
        return model(**batch).logits  # type: ignore[no-any-return]


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "bert", dropout=0.0)
    one, two = tmp_path / "one", tmp_path / "two"
    # one process, global batch 8 (x2 accumulated): in this process
    single = train_run(load_config(CONFIG, _overrides(model_dir, tmp_path, 8)), one, progress=False)
    # two processes, 4 rows each (x2 accumulated, no_sync), relaunched by train.processes, with
    # gradient checkpointing on (it must not change the numbers, nor break under DDP)
    cmd = [sys.executable, "-m", "dora_lab.train", CONFIG, *_sets(_overrides(model_dir, tmp_path, 4)),
           "--set", "train.processes=2", "--set", "train.gradient_checkpointing=true", "--run-dir", str(two)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]

    ranks = json.loads((two / "distributed.json").read_text())
    assert ranks["world_size"] == 2 and ranks["allocation_identical"]
    assert ranks["max_weight_diff"] == 0.0  # DDP's averaged gradients are the same bytes on both ranks
    assert ranks["rows_per_rank"] == [64, 64]  # each rank trained on half of 2 epochs x 64 rows

    allocation = json.loads((two / "allocation.json").read_text())
    assert allocation == single.allocation
    assert sum(allocation.values()) == 2 * len(allocation)  # target rank 2, compacted
    kept = json.loads((two / "scores.json").read_text())["kept_components"]
    assert kept == json.loads((one / "scores.json").read_text())["kept_components"]

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["steps"] == single.steps == 8  # 64 rows / (8 x 2) x 2 epochs
    for mine, theirs in zip(metrics["history"], single.history, strict=True):
        assert mine["step"] == theirs["step"]
        assert mine["matthews_correlation"] == pytest.approx(theirs["matthews_correlation"], abs=1e-6)

    a, b = _logits(one / "adapter", model_dir), _logits(two / "adapter", model_dir)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), f"max |diff| {float((a - b).abs().max()):.3g}"


PLUGIN = '''
import os
import socket
from dora_lab import Scorer, register_scorer
from dora_lab.core.scorers import make_scorer


@register_scorer("fails_on_rank_1")
class FailsOnRank1(Scorer):
    """Magnitude scores, except that rank 1 raises at its third update."""

    def __init__(self):
        self.inner = make_scorer("magnitude")
        self.updates = 0

    def update(self, layers):
        self.updates += 1
        if os.environ.get("RANK") == "1" and self.updates == 3:
            raise RuntimeError("rank 1 fails on purpose at its third score update")
        self.inner.update(layers)

    def scores(self):
        return self.inner.scores()

'''


def test_a_failing_rank_ends_both_processes_with_its_error(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "bert", dropout=0.0)
    plugin = tmp_path / "failing.py"
    plugin.write_text(PLUGIN)
    overrides = [*tiny_overrides(model_dir, tmp_path, train=64, evals=16), "train.batch_size=4",
                 f"plugins=[{plugin}]", "scorer.name=fails_on_rank_1", "scorer.params={}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "dora_lab.train", CONFIG, *_sets(overrides), "--run-dir", str(tmp_path / "run")]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr
    assert time.monotonic() - start < TIMEOUT / 2  # ended by the failure, not by a timeout
    assert not (tmp_path / "run" / "metrics.json").exists()  # rank 0 did not finish alone


def test_processes_must_match_torchrun(tmp_path: Path) -> None:
    model_dir = tmp_path / "bert"  # never loaded: the check comes first
    overrides = [*tiny_overrides(model_dir, tmp_path), "train.processes=3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "dora_lab.train", CONFIG, *_sets(overrides)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "train.processes is 3 but torchrun started 2" in proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_trainer_callback_under_accelerate_launch_equals_one_process(tmp_path: Path) -> None:
    """``accelerate launch`` (torchrun underneath, gloo on the CPU) with 2 x 4 rows vs one process with 8."""
    pytest.importorskip("accelerate")
    model_dir = make_tiny_model_dir(tmp_path / "bert", dropout=0.0)
    script = str(REPO / "tests" / "trainer_ddp_script.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]
    proc = subprocess.run([*launch, script, str(model_dir), str(tmp_path / "two"), "4"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, script, str(model_dir), str(tmp_path / "one"), "8"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1, one = (torch.load(tmp_path / d / f"rank{r}.pt") for d, r in (("two", 0), ("two", 1), ("one", 0)))

    assert rank0["history"] == rank1["history"] == one["history"]  # same budgets, prune steps, active counts
    assert rank0["allocation"] == rank1["allocation"] == one["allocation"]
    assert sum(one["allocation"].values()) == 12  # target rank 1 x 12 layers
    for name, weight in one["weights"].items():  # compacted at the end: the same shapes as one process
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
        assert torch.allclose(rank0["weights"][name], weight, atol=1e-5, rtol=0), name


def test_study_trials_run_in_two_processes_and_a_failing_rank_fails_its_trial(tmp_path: Path) -> None:
    """``train.processes=2`` in a study: each trial is a torchrun of 2 ranks whose evaluations reach
    Optuna and MLflow live; a rank that raises makes its trial FAIL with that rank's error."""
    import optuna

    from dora_lab.core.scorers import SCORERS
    from dora_lab.studies import main as study_main

    model_dir = make_tiny_model_dir(tmp_path / "bert", dropout=0.0)
    plugin = tmp_path / "failing.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    sets = [*tiny_overrides(model_dir, out, train=64, evals=16), "train.batch_size=4", "train.eval_every=4",
            "train.processes=2", f"plugins=[{plugin}]", "scorer.params={}", "study.name=ddp", "study.overrides={}",
            "study.sampler=grid", "study.n_trials=null", "study.timeout=null",
            "study.space={scorer.name: {type: categorical, choices: [magnitude, fails_on_rank_1]}}"]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO)  # the trials' torchrun children import this checkout
    try:
        assert study_main([CONFIG, *_sets(sets)]) == 0
    finally:
        SCORERS.remove("fails_on_rank_1")
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    study = optuna.load_study(study_name="ddp", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = {t.params["scorer.name"]: t for t in study.trials}
    good, bad = trials["magnitude"], trials["fails_on_rank_1"]
    assert good.state.name == "COMPLETE"
    assert sorted(good.intermediate_values) == [4, 8, 12, 16]  # reported as rank 0 evaluated
    run_dir = Path(good.user_attrs["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert good.value == metrics["best"] and good.user_attrs["active_components"] == 2 * 12
    assert json.loads((run_dir / "distributed.json").read_text())["rows_per_rank"] == [64, 64]
    assert bad.state.name == "FAIL"
    assert "RuntimeError: rank 1 fails on purpose" in bad.user_attrs["fail_reason"]


def test_study_workers_get_disjoint_gpu_groups_when_there_are_enough() -> None:
    from dora_lab.run.distributed import gpu_groups

    assert gpu_groups(["0", "1", "2", "3"], workers=2, per_trial=2) == ["0,1", "2,3"]
    assert gpu_groups(["4", "6", "7"], workers=3, per_trial=1) == ["4", "6", "7"]
    assert gpu_groups(["0", "1", "2"], workers=2, per_trial=2) == [None, None]  # too few: they share
    assert gpu_groups([], workers=2, per_trial=1) == [None, None]  # the CPU


def test_a_hook_that_raises_stops_every_rank_of_a_followed_run(tmp_path: Path) -> None:
    """What a pruned study trial does: the study's hook raises, and torchrun with its ranks is stopped."""
    from dora_lab.run.callbacks import TrainCallback
    from dora_lab.run.distributed import run_in_processes

    class Prune(TrainCallback):
        def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
            raise KeyError(f"pruned at step {step}")  # any exception; Optuna's TrialPruned in a study

    model_dir = make_tiny_model_dir(tmp_path / "bert", dropout=0.0)
    cfg = load_config(CONFIG, [*tiny_overrides(model_dir, tmp_path, train=64, evals=16), "train.batch_size=4",
                               "train.processes=2", "train.max_steps=400", "train.eval_every=2"])
    run = tmp_path / "run"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        with pytest.raises(KeyError, match="pruned at step 2"):
            run_in_processes(cfg, run, [Prune()], poll=0.1)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    size = (run / "events.jsonl").stat().st_size
    time.sleep(3)
    assert (run / "events.jsonl").stat().st_size == size  # rank 0 writes no more: it is gone
    assert not (run / "metrics.json").exists()
