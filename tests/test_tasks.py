"""Task specs and GLUE metrics, each metric against a case worked by hand."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_lab import RegistryError
from dora_lab.run import tasks
from dora_lab.run.config import load_config_dict
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.rows import DataError
from dora_lab.run.tasks import (
    TASKS,
    TaskSpec,
    compute_metrics,
    get_task,
    language_model_metrics,
    list_tasks,
    register_task,
)


def logits_for(pred_ids: list[int], num_labels: int = 2) -> np.ndarray:
    """Logits whose argmax is ``pred_ids`` (not one-hot, so argmax is really used)."""
    out = np.full((len(pred_ids), num_labels), -0.3)
    out[np.arange(len(pred_ids)), pred_ids] = 1.7
    return out


def test_the_eight_tasks() -> None:
    expected = {
        "cola": (("sentence",), 2, "matthews_correlation", ("validation",)),
        "sst2": (("sentence",), 2, "accuracy", ("validation",)),
        "mrpc": (("sentence1", "sentence2"), 2, "accuracy", ("validation",)),
        "stsb": (("sentence1", "sentence2"), 1, "pearson", ("validation",)),
        "qqp": (("question1", "question2"), 2, "accuracy", ("validation",)),
        "mnli": (("premise", "hypothesis"), 3, "accuracy", ("validation_matched", "validation_mismatched")),
        "qnli": (("question", "sentence"), 2, "accuracy", ("validation",)),
        "rte": (("sentence1", "sentence2"), 2, "accuracy", ("validation",)),
    }
    classifiers = {name for name in TASKS if TASKS[name].kind == "classifier"}
    assert classifiers == set(expected)
    assert set(TASKS) - classifiers == {f"{n}_prompt" for n in expected if n != "stsb"} | {"instruct", "chat"}
    for name, (fields, num_labels, main, evals) in expected.items():
        spec = get_task(name)
        assert (spec.name, spec.text_fields, spec.num_labels, spec.main_metric, spec.eval_splits) == (
            name, fields, num_labels, main, evals)
        assert spec.is_regression == (name == "stsb")
        assert spec.hub_path == ("nyu-mll/glue", name)
    assert get_task("CoLA") is TASKS["cola"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["cola"].num_labels = 3  # type: ignore[misc]


def test_unknown_task_lists_the_eight() -> None:
    with pytest.raises(ValueError, match="unknown task 'colaa'") as err:
        get_task("colaa")
    for name in TASKS:
        assert name in str(err.value)


def test_main_metric_is_always_computed() -> None:
    for spec in TASKS.values():
        if spec.is_instruction:  # no labels: its metrics come from the token NLLs (tests/test_causal.py)
            assert spec.main_metric in language_model_metrics(6.0, 3)
            with pytest.raises(ValueError, match="instruction data"):
                compute_metrics(spec, [0.0], [0])
            continue
        n = 6
        labels = np.linspace(0, 5, n) if spec.is_regression else np.arange(n) % spec.num_labels
        preds = labels[::-1].copy() if spec.is_regression else logits_for(list(labels), spec.num_labels)
        assert spec.main_metric in compute_metrics(spec, preds, labels)


def test_cola_matthews_by_hand() -> None:
    # Confusion matrix (positive = 1): TP=3, TN=2, FP=1, FN=2.
    labels = [1, 1, 1, 0, 0, 0, 1, 1]
    preds = [1, 1, 1, 0, 0, 1, 0, 0]
    tp, tn, fp, fn = 3, 2, 1, 2
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 4 / sqrt(240)
    out = compute_metrics(get_task("cola"), logits_for(preds), labels)
    assert out == pytest.approx({"matthews_correlation": mcc, "accuracy": (tp + tn) / 8})
    assert out["matthews_correlation"] == pytest.approx(0.2581988897)
    assert all(type(v) is float for v in out.values())


def test_mcc_of_a_constant_prediction_is_zero() -> None:
    out = compute_metrics(get_task("cola"), logits_for([1] * 5), [1, 0, 1, 1, 0])
    assert out["matthews_correlation"] == 0.0 and type(out["matthews_correlation"]) is float
    assert out["accuracy"] == pytest.approx(0.6)


def test_mrpc_and_qqp_f1_by_hand() -> None:
    # TP=3, FP=1, FN=2, TN=1: precision 3/4, recall 3/5, F1 = 2*TP / (2*TP + FP + FN) = 6/9.
    labels = [1, 1, 1, 1, 1, 0, 0]
    preds = [1, 1, 1, 0, 0, 1, 0]
    precision, recall = 3 / 4, 3 / 5
    f1 = 2 * precision * recall / (precision + recall)
    for name in ("mrpc", "qqp"):
        out = compute_metrics(get_task(name), logits_for(preds), labels)
        assert out == pytest.approx({"accuracy": 4 / 7, "f1": f1})
        assert f1 == pytest.approx(6 / 9)
    assert set(compute_metrics(get_task("rte"), logits_for(preds), labels)) == {"accuracy"}


def test_mnli_accuracy_from_torch_logits() -> None:
    labels = torch.tensor([0, 1, 2, 2, 1])
    logits = torch.tensor(logits_for([0, 1, 1, 2, 0], 3), dtype=torch.bfloat16)
    assert compute_metrics(get_task("mnli"), logits, labels) == {"accuracy": pytest.approx(3 / 5)}
    # Class ids are accepted as well as logits.
    assert compute_metrics(get_task("mnli"), [0, 1, 1, 2, 0], labels)["accuracy"] == pytest.approx(0.6)


def test_stsb_pearson_spearman_by_hand() -> None:
    preds = np.array([[1.0], [2.0], [3.0], [10.0]])  # (n, 1), as a regression head returns
    labels = [0.0, 1.0, 2.0, 3.0]
    # Deviations from the means 4 and 1.5: x (-3, -2, -1, 6), y (-1.5, -0.5, 0.5, 1.5);
    # sum xy = 14, sum xx = 50, sum yy = 5.  Ranks agree exactly: Spearman 1.
    pearson = 14 / math.sqrt(50 * 5)
    out = compute_metrics(get_task("stsb"), preds, labels)
    assert out == pytest.approx({"pearson": pearson, "spearmanr": 1.0})
    assert all(type(v) is float for v in out.values())
    # Rank correlation on a hand case with a swap: ranks (1,2,3,4) vs (1,3,2,4): 1 - 6*2/(4*15) = 0.8.
    swapped = compute_metrics(get_task("stsb"), np.array([1.0, 2.0, 3.0, 4.0]), [1.0, 3.0, 2.0, 4.0])
    assert swapped["spearmanr"] == pytest.approx(0.8)
    assert swapped["pearson"] == pytest.approx(0.8)  # sum xy 4 over sqrt(5 * 5)


def test_constant_regression_output_scores_zero_not_nan() -> None:
    out = compute_metrics(get_task("stsb"), np.full(4, 2.5), [0.0, 1.0, 4.0, 5.0])
    assert out == {"pearson": 0.0, "spearmanr": 0.0}


@pytest.mark.parametrize(
    ("name", "preds", "labels", "match"),
    [
        ("cola", np.zeros((3, 3)), [0, 1, 0], "has 2 labels"),
        ("cola", np.zeros((2, 2)), [0, 1, 0], "2 predictions for 3 labels"),
        ("cola", np.array([0.2, 0.7]), [0, 1], "logits of shape"),
        ("stsb", np.zeros((3, 2)), [0.0, 1.0, 2.0], "regression task"),
        ("cola", np.zeros((0, 2)), [], "zero examples"),
    ],
)
def test_bad_shapes_say_what_was_expected(name: str, preds: np.ndarray, labels: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(get_task(name), preds, labels)


def test_module_doctest() -> None:
    result = doctest.testmod(tasks, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- tasks as data: a made-up task, registered, loads and evaluates through the same code ---------------
@pytest.fixture
def tiny_task() -> Iterator[TaskSpec]:
    """A two-class task with named labels and F1 as its main metric, unregistered when the test ends."""
    spec = TaskSpec(name="tiny_review", text_fields=("review",), num_labels=2, is_regression=False,
                    main_metric="f1", eval_splits=("validation",), hub_path=("someone/reviews", "tiny"),
                    label_names=("bad", "good"), metrics=("f1", "accuracy"))
    assert register_task(spec) is spec
    yield spec
    TASKS.remove("tiny_review")


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_registered_task_loads_local_data_and_evaluates(tmp_path: Path, tiny_task: TaskSpec) -> None:
    assert "tiny_review" in TASKS and get_task("Tiny_Review") is tiny_task and "tiny_review" in list_tasks()
    write_jsonl(tmp_path / "train.jsonl", [{"review": "fine", "label": "good"}, {"review": "meh", "label": 0}])
    write_jsonl(tmp_path / "validation.jsonl", [{"review": t, "label": y} for t, y in
                                                (("a", "good"), ("b", "bad"), ("c", "good"), ("d", "bad"))])
    splits = load_splits(tiny_task, tmp_path)
    assert [r["label"] for r in splits["train"]] == [1, 0]
    gold = [r["label"] for r in splits["validation"]]
    assert gold == [1, 0, 1, 0]
    out = compute_metrics(tiny_task, logits_for([1, 1, 0, 0]), gold)
    assert out == {"f1": pytest.approx(0.5), "accuracy": pytest.approx(0.5)} and list(out) == ["f1", "accuracy"]
    write_jsonl(tmp_path / "validation.jsonl", [{"review": "e", "label": "great"}])
    with pytest.raises(DataError, match=r"label 'great'; tiny_review labels must be integers in \[0, 2\) \(0\.\.1\) "
                                        r"or the names bad, good"):
        load_splits(tiny_task, tmp_path)
    # a config names it like a GLUE task
    assert load_config_dict({"task": {"name": "tiny_review"}}).task.name == "tiny_review"


def test_a_regression_task_checks_its_own_label_range(tmp_path: Path) -> None:
    spec = register_task(TaskSpec(name="tiny_rating", text_fields=("a", "b"), num_labels=1, is_regression=True,
                                  main_metric="spearmanr", eval_splits=("validation",), hub_path=("x/y", "z"),
                                  label_range=(1.0, 10.0)))
    try:
        assert spec.metrics == ("pearson", "spearmanr")
        for split in ("train", "validation"):
            write_jsonl(tmp_path / f"{split}.jsonl", [{"a": "x", "b": "y", "label": v} for v in (1, 10, 7.5)])
        assert [r["label"] for r in load_splits(spec, tmp_path)["validation"]] == [1.0, 10.0, 7.5]
        write_jsonl(tmp_path / "validation.jsonl", [{"a": "x", "b": "y", "label": 0.5}])  # fine for stsb
        with pytest.raises(DataError, match=r"label 0\.5; tiny_rating labels must be numbers in \[1, 10\]"):
            load_splits(spec, tmp_path)
        assert compute_metrics(spec, [1.0, 2.0, 4.0], [1.0, 3.0, 9.0])["spearmanr"] == pytest.approx(1.0)
    finally:
        TASKS.remove("tiny_rating")


def test_a_task_from_a_plugin_file_is_accepted_by_a_config(tmp_path: Path) -> None:
    plugin = tmp_path / "my_task.py"
    plugin.write_text("from dora_lab import TaskSpec, register_task\n\n"
                      "register_task(TaskSpec(name='plugin_task', text_fields=('text',), num_labels=3,\n"
                      "    is_regression=False, main_metric='accuracy', eval_splits=('validation',),\n"
                      "    hub_path=('me/data', 'default')))\n")
    try:
        with pytest.raises(ConfigError, match="task.name: unknown task 'plugin_task'; choose one of: cola"):
            load_config_dict({"task": {"name": "plugin_task"}})
        cfg = load_config_dict({"plugins": [str(plugin)], "task": {"name": "plugin_task"}})
        assert get_task(cfg.task.name).num_labels == 3
    finally:
        TASKS.remove("plugin_task")


@pytest.mark.parametrize(("fields", "match"), [
    ({"metrics": ("accuracy", "bleu")}, r"task 'bad': unknown classification metric\(s\) \['bleu'\]; choose from "
                                        r"accuracy, matthews_correlation, f1"),
    ({"main_metric": "f1"}, r"task 'bad': main_metric 'f1' is not among its metrics \(accuracy\)"),
    ({"label_range": (0.0, 1.0)}, r"only a regression task has one"),
])
def test_a_task_spec_that_cannot_work_is_refused(fields: dict[str, object], match: str) -> None:
    kwargs: dict[str, object] = {"name": "bad", "text_fields": ("t",), "num_labels": 2, "is_regression": False,
                                 "main_metric": "accuracy", "eval_splits": ("validation",), "hub_path": ("a", "b"),
                                 "metrics": ("accuracy",), **fields}
    with pytest.raises(RegistryError, match=match):
        TaskSpec(**kwargs)  # type: ignore[arg-type]


def test_a_task_name_clash_is_refused() -> None:
    with pytest.raises(RegistryError, match=r"task 'cola' is already registered by dora_lab\.run\.tasks \(register_task\); "
                                            r"pick another name, or pass replace=True"):
        register_task(dataclasses.replace(TASKS["cola"], num_labels=3))
    assert TASKS["cola"].num_labels == 2
