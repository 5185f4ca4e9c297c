"""The tasks (the eight GLUE tasks built in, their prompt versions, instruction data) and their metrics.

A :class:`TaskSpec` is all there is to a task, as data: what its rows look like (the text
columns, the label column is always ``label``), its labels (how many, their names, a
regression's allowed range), which splits are evaluated, which metrics are computed and which
one ranks runs, and where it lives on the Hugging Face Hub.  :func:`compute_metrics` turns raw
model outputs into those metrics with scipy / scikit-learn (no ``evaluate``).

Two kinds of task (``TaskSpec.kind``): ``classifier`` tasks train a sequence-classification head
(the GLUE eight); ``causal`` tasks train a causal language model
(:mod:`dora_lab.run.causal` turns their rows into tokens):

- *GLUE as prompts* (``cola_prompt``, ``sst2_prompt``, ... one per GLUE classification task, from
  :data:`PROMPT_TEMPLATES`): the row is written into a prompt, each label is a verbaliser (a
  short answer text); training is the LM loss on the gold verbaliser's tokens, evaluation picks
  the label whose verbaliser has the highest total log-likelihood after the prompt, and the
  GLUE task's own metrics (MCC, accuracy, F1) come out;
- *instruction data* (``instruct``): rows of ``prompt`` and ``response``; training is the LM loss on
  the response tokens, evaluation the mean token NLL over every response token of the held-out
  split (``loss``) and ``perplexity = exp(loss)`` (lower is better: :attr:`TaskSpec.greater_is_better`);
- *chat data* (``chat``): rows of ``messages`` (role/content turns, multi-turn) and an optional
  ``system``; the same loss and metrics over the assistant turns.

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

import dataclasses
import math
import string
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.registry import Registry, RegistryError

__all__ = ["KINDS", "LABEL_COLUMN", "LOWER_IS_BETTER", "METRICS", "PROMPT_TEMPLATES", "TASKS", "TaskSpec",
           "chat_task", "compute_metrics", "get_task", "instruction_task", "language_model_metrics", "list_tasks", "prompt_task", "register_task"]

#: The label column of every GLUE task (``nyu-mll/glue`` and local files alike).
LABEL_COLUMN = "label"

_HUB = "nyu-mll/glue"

#: The metrics a task may name, by kind of task.
METRICS = {
    "classification": ("accuracy", "matthews_correlation", "f1"),  # f1: of the positive class 1
    "regression": ("pearson", "spearmanr"),
    "language_modeling": ("perplexity", "loss"),  # over the response tokens of the held-out split
}
#: Metrics where lower is better (a run's best evaluation is its lowest).
LOWER_IS_BETTER = frozenset({"perplexity", "loss"})
#: ``classifier``: a sequence-classification head; ``causal``: a causal language model.
KINDS = ("classifier", "causal")


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

    ``kind`` is ``classifier`` or ``causal`` (see the module docstring).  A causal task with
    ``verbalizers`` (one answer text per label, in label order) is a classification task asked as
    ``prompt`` (a :meth:`str.format` template over the text fields); a causal task without them
    is instruction data whose ``text_fields`` are ``(prompt, response)`` and which has no labels
    (``num_labels`` 0).
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
    kind: str = "classifier"
    prompt: str = ""
    verbalizers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_kind()
        kind = self.metric_kind
        if not self.metrics:
            default = METRICS[kind] if kind != "classification" else tuple(dict.fromkeys((self.main_metric,
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

    def _check_kind(self) -> None:
        if self.kind not in KINDS:
            raise RegistryError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "classifier":
            if self.prompt or self.verbalizers:
                raise RegistryError(f"task {self.name!r}: a prompt and verbalizers belong to a causal task; "
                                    f"set kind='causal'")
            return
        if self.is_regression:
            raise RegistryError(f"task {self.name!r}: a causal task cannot be a regression (num_labels 1)")
        if not self.verbalizers:
            if self.num_labels != 0 or len(self.text_fields) not in (1, 2) or self.prompt:
                raise RegistryError(f"task {self.name!r}: an instruction task (causal, no verbalizers) has "
                                    f"num_labels 0, no prompt template and two text fields (prompt, response) "
                                    f"or one (messages); use instruction_task() or chat_task()")
            return
        if len(self.verbalizers) != self.num_labels or len(set(self.verbalizers)) != self.num_labels or not all(
                v.strip() for v in self.verbalizers):
            raise RegistryError(f"task {self.name!r}: verbalizers {self.verbalizers} must be {self.num_labels} "
                                f"distinct non-blank texts, one per label in label order")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None}
        if not fields or not fields <= set(self.text_fields):
            raise RegistryError(f"task {self.name!r}: prompt template {self.prompt!r} must use {{field}} "
                                f"placeholders of its text fields only ({', '.join(self.text_fields)})")

    @property
    def metric_kind(self) -> str:
        """The :data:`METRICS` key of this task: ``classification``, ``regression`` or ``language_modeling``."""
        if self.is_instruction:
            return "language_modeling"
        return "regression" if self.is_regression else "classification"

    @property
    def is_causal(self) -> bool:
        """Trained as a causal language model (a prompt task or instruction data)."""
        return self.kind == "causal"

    @property
    def is_instruction(self) -> bool:
        """Instruction data: a causal task without labels, scored by perplexity."""
        return self.kind == "causal" and not self.verbalizers

    @property
    def is_chat(self) -> bool:
        """Chat data: instruction data of one ``messages`` column (role/content turns)."""
        return self.is_instruction and len(self.text_fields) == 1

    @property
    def greater_is_better(self) -> bool:
        """Whether a higher ``main_metric`` is better (False for ``perplexity`` and ``loss``)."""
        return self.main_metric not in LOWER_IS_BETTER

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a row must have: the text fields, then ``label`` (none for instruction data)."""
        return self.text_fields if self.is_instruction else (*self.text_fields, LABEL_COLUMN)


def _task(name: str, text_fields: tuple[str, ...], *, num_labels: int = 2, main_metric: str = "accuracy",
          eval_splits: tuple[str, ...] = ("validation",), label_names: tuple[str, ...] = (),
          glue_columns: dict[str, str] | None = None, glue_headerless: tuple[str, ...] = (),
          metrics: tuple[str, ...] = (), label_range: tuple[float, float] | None = None) -> TaskSpec:
    return TaskSpec(name=name, text_fields=text_fields, num_labels=num_labels, is_regression=num_labels == 1,
                    main_metric=main_metric, eval_splits=eval_splits, hub_path=(_HUB, name), label_names=label_names,
                    glue_columns=tuple((glue_columns or {}).items()), glue_headerless=glue_headerless,
                    metrics=metrics, label_range=label_range)


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
        _task("mnli", ("premise", "hypothesis"), num_labels=3,
              eval_splits=("validation_matched", "validation_mismatched"),
              label_names=("entailment", "neutral", "contradiction"),
              glue_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": LABEL_COLUMN}),
        _task("qnli", ("question", "sentence"), label_names=("entailment", "not_entailment")),
        _task("rte", ("sentence1", "sentence2"), label_names=("entailment", "not_entailment")),
):
    register_task(_spec)

#: GLUE as prompts, one row per classification task: (prompt template, one verbaliser per label in
#: the label order of ``nyu-mll/glue``).  The verbalisers start with a space: after ``Answer:`` in
#: the plain format a word is tokenised with its leading space; with a chat template the space is
#: dropped (the answer opens the assistant's turn), see :mod:`dora_lab.run.causal`.
PROMPT_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cola": ("Is this sentence grammatical?\nSentence: {sentence}\nAnswer:", (" no", " yes")),
    "sst2": ("Is the sentiment of this review positive or negative?\nReview: {sentence}\nAnswer:",
             (" negative", " positive")),
    "mrpc": ("Do these two sentences mean the same thing?\nSentence 1: {sentence1}\nSentence 2: {sentence2}"
             "\nAnswer:", (" no", " yes")),
    "qqp": ("Do these two questions ask the same thing?\nQuestion 1: {question1}\nQuestion 2: {question2}"
            "\nAnswer:", (" no", " yes")),
    "mnli": ("{premise}\nQuestion: Does this imply that \"{hypothesis}\"? Yes, maybe, or no?\nAnswer:",
             (" yes", " maybe", " no")),
    "qnli": ("Does the sentence answer the question?\nQuestion: {question}\nSentence: {sentence}\nAnswer:",
             (" yes", " no")),
    "rte": ("{sentence1}\nQuestion: Does this imply that \"{sentence2}\"? Yes or no?\nAnswer:", (" yes", " no")),
}


def prompt_task(base: TaskSpec, prompt: str, verbalizers: Sequence[str], name: str | None = None) -> TaskSpec:
    """``base`` (a GLUE classification task) asked as ``prompt`` with one verbaliser per label: the
    same data, splits and metrics, kind ``causal``, named ``<base>_prompt`` unless ``name``."""
    return dataclasses.replace(base, name=name or f"{base.name}_prompt", kind="causal", prompt=prompt,
                               verbalizers=tuple(verbalizers))


def instruction_task(name: str, *, eval_splits: tuple[str, ...] = ("validation",),
                     hub_path: tuple[str, str] = ("", "")) -> TaskSpec:
    """Instruction data called ``name``: rows of ``prompt`` and ``response`` (other column names are
    mapped with the config key ``task.columns``), scored by perplexity on ``eval_splits``.
    ``hub_path`` is a Hub dataset's ``(path, config)`` with those splits (empty: local files only)."""
    return TaskSpec(name=name, text_fields=("prompt", "response"), num_labels=0, is_regression=False,
                    main_metric="perplexity", eval_splits=eval_splits, hub_path=hub_path, kind="causal")


def chat_task(name: str, *, eval_splits: tuple[str, ...] = ("validation",)) -> TaskSpec:
    """Chat data called ``name``: rows with ``messages`` (role/content turns, optional ``system``),
    the loss on the assistant turns (:mod:`dora_lab.run.causal`), scored by perplexity."""
    return dataclasses.replace(instruction_task(name, eval_splits=eval_splits), text_fields=("messages",))


for _glue, (_prompt, _verbalizers) in PROMPT_TEMPLATES.items():
    register_task(prompt_task(TASKS.get(_glue), _prompt, _verbalizers))
register_task(instruction_task("instruct"))
register_task(chat_task("chat"))


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` called ``name`` (case-insensitive); ValueError lists the registered ones."""
    key = str(name).lower()
    if key not in TASKS:
        raise RegistryError(
            f"unknown task {name!r}; choose one of: {', '.join(TASKS)} (the registered tasks). "
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

    if spec.is_instruction:
        raise ValueError(f"{spec.name} is instruction data (no labels): its metrics come from "
                         f"language_model_metrics(nll_sum, tokens)")
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


def language_model_metrics(nll_sum: float, tokens: int) -> dict[str, float]:
    """``loss``: the mean token NLL (nats) over ``tokens`` response tokens whose NLLs sum to
    ``nll_sum`` (token-weighted: a long response counts more than a short one), and
    ``perplexity = exp(loss)``.

    >>> language_model_metrics(2 * math.log(4.0), 2)
    {'perplexity': 4.0, 'loss': 1.3862943611198906}
    """
    if tokens < 1:
        raise ValueError("cannot compute a perplexity over zero response tokens")
    loss = float(nll_sum) / int(tokens)
    return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}
