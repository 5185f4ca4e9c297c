"""``train.compile``: a compiled training run keeps the eager run's allocation and metrics (issue 27).

The compiled run goes through pruning (masks written in place), the frozen mask (``hard_mask``) and
compaction (smaller ``A``, ``B``, ``c``) on a tiny BERT; without dropout both runs draw no random
numbers in the step, so they must agree to float rounding.  Minutes on a CPU: inductor builds C++
kernels for each graph (benchmarks/bench_compile.py measures that warm-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dora_lab.run.compile import check_compiler, compile_counts
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.train import train_run
from tests.tiny import COLA, REPO, LossRecorder, make_tiny_model_dir, one_thread, tiny_overrides

pytestmark = pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")


def _run(model_dir: Path, out: Path, compiled: bool) -> tuple[object, list[float], dict[str, object]]:
    cfg = load_config(REPO / "configs" / "cola.yaml", [
        *tiny_overrides(model_dir, out), "adapter.dropout=0", "train.max_steps=24", "train.lr=5e-3",
        "train.eval_every=12", f"train.compile={str(compiled).lower()}"])
    losses = LossRecorder()
    torch._dynamo.reset()
    with one_thread():
        result = train_run(cfg, out / f"compiled{compiled}", callbacks=[losses], progress=False)  # type: ignore[list-item]
    scores = json.loads((out / f"compiled{compiled}" / "scores.json").read_text())
    return result, losses.values, scores


@pytest.mark.slow
def test_compiled_run_gives_the_eager_allocation_and_metrics(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "bert", dropout=0.0, init_range=0.2)
    eager, eager_losses, eager_scores = _run(model_dir, tmp_path, compiled=False)
    compiled, compiled_losses, compiled_scores = _run(model_dir, tmp_path, compiled=True)
    counts = compile_counts()
    assert eager.allocation == compiled.allocation  # type: ignore[attr-defined]
    assert eager_scores["kept_components"] == compiled_scores["kept_components"]
    assert sum(eager.allocation.values()) == 2 * 12  # type: ignore[attr-defined]  # pruned to the budget
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    for before, after in zip(eager.history, compiled.history, strict=True):  # type: ignore[attr-defined]
        assert after == pytest.approx(before, abs=1e-4)
    # pruning changes mask values only; the frozen mask and compaction recompile once each at most,
    # and rows of other lengths once (then dynamic): a bounded number, and no graph break
    assert counts["breaks"] == 0, counts
    assert 1 <= counts["frames"] <= 4, counts


def test_compile_without_a_cpp_compiler_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="train.compile: true needs a C\\+\\+ compiler"):
        check_compiler(torch.device("cpu"), True)
    check_compiler(torch.device("cpu"), False)  # off: nothing to check


def test_compile_key_parses_and_defaults_off() -> None:
    assert load_config(REPO / "configs" / "cola.yaml").train.compile is False
    assert load_config(REPO / "configs" / "cola.yaml", ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(REPO / "configs" / "cola.yaml", ["train.compile=sometimes"])
