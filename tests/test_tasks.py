"""Task specs and GLUE metrics, each metric against a case worked by hand."""

from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pytest
import torch

from dora_lab import tasks
from dora_lab.tasks import TASKS, compute_metrics, get_task


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
    assert set(TASKS) == set(expected)
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
    with pytest.raises(ValueError, match="unknown GLUE task 'colaa'") as err:
        get_task("colaa")
    for name in TASKS:
        assert name in str(err.value)


def test_main_metric_is_always_computed() -> None:
    for spec in TASKS.values():
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
