"""The tasks (the eight GLUE tasks built in) and their metrics.

A :class:`TaskSpec` is all there is to a task, as data: what its rows look like (the text
columns, the label column is always ``label``), its labels (how many, their names, a
regression's allowed range), which splits are evaluated, which metrics are computed and which
one ranks runs, and where it lives on the Hugging Face Hub.  :func:`compute_metrics` turns raw
model outputs into those metrics with scipy / scikit-learn (no ``evaluate``).

A new task is one :func:`register_task` call, in this file or in a plugin (config key
``plugins``, or the entry-point group ``dora_lab.tasks``); ``task.name`` in a config must name
a registered task.

>>> spec = get_task("cola")
>>> spec.text_fields, spec.num_labels, spec.main_metric
(('sentence',), 2, 'matthews_correlation')
>>> compute_metrics(spec, [[2.0, -1.0], [0.1, 0.3], [0.0, 1.0]], [0, 1, 0])
{'matthews_correlation': 0.5, 'accuracy': 0.6666666666666666}
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.registry import Registry, RegistryError

__all__ = ["LABEL_COLUMN", "METRICS", "TASKS", "TaskSpec", "compute_metrics", "get_task", "list_tasks",
           "register_task"]

#: The label column of every GLUE task (``nyu-mll/glue`` and local files alike).
LABEL_COLUMN = "label"

_HUB = "nyu-mll/glue"

#: The metrics a task may name, by kind of task.
METRICS = {
    "classification": ("accuracy", "matthews_correlation", "f1"),  # f1: of the positive class 1
    "regression": ("pearson", "spearmanr"),
}


@dataclass(frozen=True)
class TaskSpec:
    """What one GLUE task looks like.

    ``text_fields`` are the input columns (one for single-sentence tasks, two for pair tasks,
    fed to the tokenizer as a pair); ``num_labels`` is the width of the model head (1 for the
    regression task stsb); ``eval_splits`` are the splits evaluated besides ``train``;
    ``hub_path`` is the ``(path, config)`` pair for :func:`datasets.load_dataset`.
    ``metrics`` are the metrics computed at each evaluation, in order (from :data:`METRICS`;
    empty: ``main_metric`` and accuracy for classification, pearson and spearmanr for
    regression); ``main_metric`` must be one of them.  ``label_range`` is a regression's allowed
    ``(low, high)`` label range, both ends included (None: any finite number).

    How the task's files look in the GLUE download itself (``glue_data/<TASK>/*.tsv``):
    ``label_names`` are the class names that some tasks write instead of ids, in the order of
    ``nyu-mll/glue`` (name ``i`` is label ``i``); ``glue_columns`` renames GLUE's header names to
    these columns (``(("Quality", "label"), ...)``); ``glue_headerless`` names the columns of a
    GLUE file that has no header row (CoLA's: source, label, original label, sentence).
    """

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    is_regression: bool
    main_metric: str
    eval_splits: tuple[str, ...]
    hub_path: tuple[str, str]
    label_names: tuple[str, ...] = ()
    glue_columns: tuple[tuple[str, str], ...] = ()
    glue_headerless: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    label_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        kind = "regression" if self.is_regression else "classification"
        if not self.metrics:
            default = METRICS["regression"] if self.is_regression else tuple(dict.fromkeys((self.main_metric,
                                                                                            "accuracy")))
            object.__setattr__(self, "metrics", default)
        unknown = [m for m in self.metrics if m not in METRICS[kind]]
        if unknown:
            raise RegistryError(f"task {self.name!r}: unknown {kind} metric(s) {unknown}; "
                                f"choose from {', '.join(METRICS[kind])}")
        if self.main_metric not in self.metrics:
            raise RegistryError(f"task {self.name!r}: main_metric {self.main_metric!r} is not among its "
                                f"metrics ({', '.join(self.metrics)})")
        if self.label_range is not None and (self.label_range[0] > self.label_range[1] or not self.is_regression):
            raise RegistryError(f"task {self.name!r}: label_range {self.label_range} must be (low, high) with "
                                f"low <= high, and only a regression task has one")

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a row must have: the text fields, then ``label``."""
        return (*self.text_fields, LABEL_COLUMN)


def _task(
    name: str,
    text_fields: tuple[str, ...],
    *,
    num_labels: int = 2,
    main_metric: str = "accuracy",
    eval_splits: tuple[str, ...] = ("validation",),
    label_names: tuple[str, ...] = (),
    glue_columns: dict[str, str] | None = None,
    glue_headerless: tuple[str, ...] = (),
    metrics: tuple[str, ...] = (),
    label_range: tuple[float, float] | None = None,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        text_fields=text_fields,
        num_labels=num_labels,
        is_regression=num_labels == 1,
        main_metric=main_metric,
        eval_splits=eval_splits,
        hub_path=(_HUB, name),
        label_names=label_names,
        glue_columns=tuple((glue_columns or {}).items()),
        glue_headerless=glue_headerless,
        metrics=metrics,
        label_range=label_range,
    )


def _check(name: str, obj: object) -> None:
    if not isinstance(obj, TaskSpec):
        raise RegistryError(f"task {name!r} must be a TaskSpec, got {type(obj).__name__}")
    if obj.name != name:
        raise RegistryError(f"task {name!r} is registered under another name than its spec's ({obj.name!r})")


#: Every registered task by name (iterate it, index it, or ``TASKS.values()``).
TASKS: Registry[TaskSpec] = Registry("task", "dora_lab.tasks", _check)


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Register ``spec`` under ``spec.name``; then ``task.name: <name>`` works in any config.

    Its name is checked and a clash with a task registered elsewhere refused like a scorer's (the
    calling module is the task's origin); returns ``spec``."""
    caller = sys._getframe(1).f_globals.get("__name__", "?")
    return TASKS.add(spec.name, spec, replace=replace, origin=f"{caller} (register_task)")


for _spec in (
        _task("cola", ("sentence",), main_metric="matthews_correlation",
              glue_headerless=("source", LABEL_COLUMN, "original_label", "sentence")),
        _task("sst2", ("sentence",)),
        _task("mrpc", ("sentence1", "sentence2"), metrics=("accuracy", "f1"),
              glue_columns={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": LABEL_COLUMN}),
        _task("stsb", ("sentence1", "sentence2"), num_labels=1, main_metric="pearson", label_range=(0.0, 5.0),
              glue_columns={"score": LABEL_COLUMN}),
        _task("qqp", ("question1", "question2"), metrics=("accuracy", "f1"),
              glue_columns={"is_duplicate": LABEL_COLUMN}),
        _task(
            "mnli",
            ("premise", "hypothesis"),
            num_labels=3,
            eval_splits=("validation_matched", "validation_mismatched"),
            label_names=("entailment", "neutral", "contradiction"),
            glue_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": LABEL_COLUMN},
        ),
        _task("qnli", ("question", "sentence"), label_names=("entailment", "not_entailment")),
        _task("rte", ("sentence1", "sentence2"), label_names=("entailment", "not_entailment")),
):
    register_task(_spec)


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` called ``name`` (case-insensitive); ValueError lists the registered ones."""
    key = str(name).lower()
    if key not in TASKS:
        raise RegistryError(
            f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)} (the registered tasks). "
            f"To add one, call register_task(TaskSpec(...)) in a module that is imported (config key "
            f"'plugins', or the entry-point group 'dora_lab.tasks')"
        )
    return TASKS.get(key)


def list_tasks() -> list[str]:
    return TASKS.names()


def _to_array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    return arr


def _finite(value: float) -> float:
    """A plain float; an undefined correlation (nan, from a constant input) counts as 0.0."""
    value = float(value)
    return 0.0 if math.isnan(value) else value


def compute_metrics(spec: TaskSpec, predictions: Any, labels: Sequence[float] | Any) -> dict[str, float]:
    """GLUE metrics of raw model outputs against gold labels, as plain Python floats.

    ``predictions`` are the model's outputs in the same order as ``labels`` (a numpy array, a
    torch tensor or nested lists): logits of shape ``(n, num_labels)`` for classification (the
    class is the argmax; a 1-D array of integer class ids is accepted too), scores of shape
    ``(n,)`` or ``(n, 1)`` for regression (stsb).

    Keys: the task's ``metrics``, in order (for GLUE: ``accuracy`` for every classification task,
    ``matthews_correlation`` for cola, ``f1`` (positive class 1) for mrpc and qqp, ``pearson`` and
    ``spearmanr`` for stsb).  A correlation
    that is undefined because one side is constant (a model predicting one class) is 0.0, not
    nan, so it can rank runs and feed Optuna.
    """
    # Imported here: scipy.stats and sklearn.metrics take seconds to import, and task lookup
    # (config validation) should not pay for them.
    from scipy import stats
    from sklearn.metrics import f1_score, matthews_corrcoef

    preds = _to_array(predictions, "predictions")
    gold = _to_array(labels, "labels")
    if gold.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {gold.shape}")
    n = gold.shape[0]
    if n == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if preds.shape[0] != n:
        raise ValueError(f"{preds.shape[0]} predictions for {n} labels: they must match one to one")

    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"{spec.name} is a regression task: predictions must have shape (n,) or (n, 1), got {preds.shape}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            regression = {
                "pearson": lambda: stats.pearsonr(preds.astype(np.float64), gold.astype(np.float64))[0],
                "spearmanr": lambda: stats.spearmanr(preds, gold)[0],
            }
            return {m: _finite(regression[m]()) for m in spec.metrics}

    if preds.ndim == 2:
        if preds.shape[1] != spec.num_labels:
            raise ValueError(
                f"{spec.name} has {spec.num_labels} labels but predictions have shape {preds.shape}; "
                f"expected logits of shape (n, {spec.num_labels})"
            )
        pred_ids = preds.argmax(axis=1)
    elif preds.ndim == 1 and np.all(np.mod(preds, 1) == 0):
        pred_ids = preds.astype(np.int64)
    else:
        raise ValueError(
            f"predictions for {spec.name} must be logits of shape (n, {spec.num_labels}) or integer "
            f"class ids of shape (n,), got shape {preds.shape} dtype {preds.dtype}"
        )
    gold_ids = gold.astype(np.int64)

    classification = {
        "accuracy": lambda: np.mean(pred_ids == gold_ids),
        "matthews_correlation": lambda: _finite(matthews_corrcoef(gold_ids, pred_ids)),
        "f1": lambda: f1_score(gold_ids, pred_ids, pos_label=1, average="binary", zero_division=0.0),
    }
    return {m: float(classification[m]()) for m in spec.metrics}
