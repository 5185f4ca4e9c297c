"""python -m dora_lab.lm_eval: lm-evaluation-harness on a saved adapter of a tiny Llama, offline, with a
local task (``dataset_path: json`` on rows this test writes).  lm-eval's loglikelihoods and its
accuracy are checked against a direct computation with the model: the continuation's token
log-probabilities summed, the choice with the highest sum taken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_c
from transformers import AutoTokenizer, LlamaForCausalLM

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'dora_lab[eval]'")

from dora_lab import adapter_layers, inject_adapters  # noqa: E402
from dora_lab.core.checkpoint import save_adapter  # noqa: E402
from dora_lab.export.checkpoint import load_adapter  # noqa: E402
from dora_lab.export.harness import evaluate, main, task_manager  # noqa: E402
from tests.tiny import make_tiny_llama_dir  # noqa: E402

ROWS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a + b + 11)], "label": k}
        for k, (a, b) in enumerate([(2, 2), (3, 5), (7, 1), (4, 4), (6, 3), (1, 8)])]
ROWS = [dict(r, label=r["label"] % 3) for r in ROWS]
TASK = """task: dora_tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(base folder, run folder with adapter/, task folder)``."""
    root = tmp_path_factory.mktemp("lm_eval")
    base_dir = make_tiny_llama_dir(root / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    inject_adapters(base, r0=3, dropout=0.0)
    randomize_c(base, 3)
    with torch.no_grad():  # an update that changes the loglikelihoods visibly
        for layer in adapter_layers(base).values():
            layer.c.mul_(3.0)
    save_adapter(base, root / "run" / "adapter", base_model=str(base_dir), num_labels=0)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tasks / "dora_tiny_sums.yaml").write_text(TASK.format(rows=tasks / "rows.jsonl"))
    return base_dir, root / "run", tasks


def direct_loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), the continuation's tokens being those the whole text adds to
    the context's (lm-eval's rule), from one forward pass of the whole text."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(start, len(whole))))


def direct_accuracy(model: Any, tokenizer: Any) -> tuple[float, list[list[float]]]:
    scores = [[direct_loglikelihood(model, tokenizer, f"Question: {r['question']}\nAnswer:", " " + c)
               for c in r["choices"]] for r in ROWS]
    right = [max(range(len(s)), key=s.__getitem__) == r["label"] for s, r in zip(scores, ROWS, strict=True)]
    return sum(right) / len(right), scores


def test_lm_eval_scores_the_adapted_model_as_a_direct_computation(saved: tuple[Path, Path, Path]) -> None:
    base_dir, run, tasks = saved
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_adapter(run / "adapter").eval()
    accuracy, scores = direct_accuracy(model, tokenizer)
    out = evaluate(model, tokenizer, ["dora_tiny_sums"], manager=task_manager(str(tasks), ["dora_tiny_sums"]),
                   batch_size=4)
    got = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["dora_tiny_sums"]}
    assert [x for i in range(len(ROWS)) for x in got[i]] == pytest.approx([x for s in scores for x in s], abs=1e-4)
    assert out["results"]["dora_tiny_sums"]["acc,none"] == pytest.approx(accuracy)
    plain = LlamaForCausalLM.from_pretrained(base_dir).eval()
    unadapted = direct_accuracy(plain, tokenizer)[1]
    assert max(abs(a - b) for u, s in zip(unadapted, scores, strict=True) for a, b in zip(u, s, strict=True)) > 1e-2


def test_the_cli_scores_the_merged_model_and_writes_json(saved: tuple[Path, Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    base_dir, run, tasks = saved
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    accuracy, _ = direct_accuracy(load_adapter(run / "adapter").eval(), tokenizer)
    out = tmp_path / "lm_eval.json"
    assert main([str(run), "--tasks", "dora_tiny_sums", "--include-path", str(tasks), "--merged",
                 "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["merged"] is True and record["tasks"] == ["dora_tiny_sums"]
    assert record["results"]["dora_tiny_sums"]["acc,none"] == pytest.approx(accuracy)
    assert "dora_tiny_sums" in capsys.readouterr().out


def test_an_unknown_task_exits_2_before_the_model_loads(saved: tuple[Path, Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, tasks = saved
    missing = tmp_path / "no_adapter_here"
    assert main([str(missing), "--tasks", "dora_no_such_task", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "'dora_no_such_task' is not an lm-eval task" in err and str(missing) not in err
