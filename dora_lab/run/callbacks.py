"""The small interface through which a training run talks to the outside (study, tracker).

Training imports neither Optuna nor MLflow: the study runner and the tracker subclass
:class:`TrainCallback`.  Every hook does nothing by default.  A hook may raise to stop the run
(Optuna's ``TrialPruned`` from :meth:`on_evaluate`, for example); the exception propagates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["EventLog", "RunInfo", "RunResult", "TrainCallback", "replay_events"]


@dataclass
class RunInfo:
    """What is known once the run is set up, before the first step."""

    config: dict[str, Any]  # the resolved config
    run_dir: Path
    total_steps: int
    steps_per_epoch: int
    trainable_parameters: int
    adapter_parameters: int  # active adapter parameters at the start
    budget_curve: list[int]  # the schedule's budget at every step (in its unit)
    budget_unit: str
    initial_metrics: dict[str, float] = field(default_factory=dict)  # eval.at_start: the evaluation at step 0


@dataclass
class RunResult:
    """What a finished run measured."""

    metric_name: str
    best_metric: float  # the best evaluation (after pruning has finished, when it prunes)
    best_step: int
    final_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    allocation: dict[str, int] = field(default_factory=dict)  # final active rank per layer
    trainable_parameters: int = 0
    adapter_parameters_final: int = 0
    active_components_final: int = 0
    steps: int = 0
    seconds: float = 0.0
    run_dir: Path | None = None
    peak_memory_mb: float = 0.0  # dora_lab.run.memory: CUDA allocator peak, or the process's peak RSS
    peak_memory_source: str = ""
    data: dict[str, dict[str, int]] = field(default_factory=dict)  # causal tasks: per split, prompts cut...
    checks: dict[str, Any] = field(default_factory=dict)  # dora_lab.run.convergence: still rising, at majority
    initial_metrics: dict[str, float] = field(default_factory=dict)  # eval.at_start: before the first step
    environment: dict[str, Any] = field(default_factory=dict)  # dora_lab.run.environment: what it ran on

    @property
    def minutes(self) -> float:
        """The run's one duration (training, evaluations included; model loading not), in minutes to
        2 decimals: metrics.json, the MLflow metric ``minutes``, the study's table and the report say this."""
        return round(self.seconds / 60, 2)

    def summary(self) -> dict[str, Any]:
        out = {
            "metric": self.metric_name,
            "best": self.best_metric,
            "best_step": self.best_step,
            "final": self.final_metrics,
            "trainable_parameters": self.trainable_parameters,
            "adapter_parameters_final": self.adapter_parameters_final,
            "active_components_final": self.active_components_final,
            "steps": self.steps,
            "minutes": self.minutes,
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "peak_memory_source": self.peak_memory_source,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }
        if self.checks:
            out["checks"] = self.checks
        if self.initial_metrics:  # eval.at_start: the model before training (the base model's number)
            out["initial"] = self.initial_metrics
        if self.data:  # a causal task: examples, prompts cut and answers dropped per split
            out["data"] = self.data
        if self.environment:
            out["environment"] = self.environment
        return out


class TrainCallback:
    """Hooks called by :func:`dora_lab.run.train.train_run`, in this order."""

    def on_train_begin(self, info: RunInfo) -> None:
        """Once, after the model, data, optimizer and controller are built."""

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        """After every optimizer step: train loss, learning rate, active components/parameters."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After each periodic evaluation (every ``train.eval_every`` steps and at the end)."""

    def on_train_end(self, result: RunResult) -> None:
        """Once, after the last evaluation and after the run's files are written."""


class EventLog(TrainCallback):
    """Writes every hook call as one JSON line, for a process that follows the run from outside
    (a study trial run by ``torchrun`` in other processes: :func:`replay_events` there)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, event: str, **data: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"event": event, **data}, default=str) + "\n")

    def on_train_begin(self, info: RunInfo) -> None:
        self._write("begin", info=asdict(info))

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self._write("step", step=step, logs=logs)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        self._write("evaluate", step=step, metrics=metrics)

    def on_train_end(self, result: RunResult) -> None:
        self._write("end", result=asdict(result))


def replay_events(stream: TextIO, callbacks: Sequence[TrainCallback]) -> RunResult | None:
    """Call ``callbacks`` for the complete lines :class:`EventLog` has written to ``stream`` since
    the last call; the run's result once its ``end`` line has come, else ``None``.  A hook that
    raises (Optuna's ``TrialPruned``) raises here, as it would in the run itself."""
    result = None
    while True:
        start = stream.tell()
        line = stream.readline()
        if not line.endswith("\n"):  # nothing new, or a line still being written: read it next time
            stream.seek(start)
            return result
        event = json.loads(line)
        kind = event["event"]
        for cb in callbacks:
            if kind == "begin":
                cb.on_train_begin(RunInfo(**{**event["info"], "run_dir": Path(event["info"]["run_dir"])}))
            elif kind == "step":
                cb.on_step(int(event["step"]), event["logs"])
            elif kind == "evaluate":
                cb.on_evaluate(int(event["step"]), event["metrics"])
        if kind == "end":
            data = event["result"]
            result = RunResult(**{**data, "run_dir": Path(data["run_dir"]) if data["run_dir"] else None})
            for cb in callbacks:
                cb.on_train_end(result)
