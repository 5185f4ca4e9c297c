"""Where a study trial's time goes outside its optimizer steps: one process runs a small dora_lab study
(bench_study's shape) in-process, with every part of a trial timed by perf_counter sections.

    python benchmarks/profile_study.py [--model tiny|minilm|PATH] [--trials 3] [--steps 16] [--out FILE.json]

The study is ``python -m dora_lab.study``'s own path (:func:`dora_lab.studies.main`, with its answer after
every trial and its summary), with bench_study's settings (TPE over lr and start rank, no pruner,
``train.batch_size=32``, an evaluation every ``steps/2`` steps).  Named functions are wrapped in timers
(:data:`SECTIONS`); a section's time is exclusive: what it spends inside another named section counts
there, so the parts add up to the whole.  ``optimizer steps`` is what the training loop spends outside
its named parts (forward, backward, AdamW, the pruning controller).  Times are split into the study's
start (before its first trial), each trial (from one ``study.ask`` to the next) and its end (the summary).
Fractions, not seconds, are what to read: the CPU is shared.  ``imports`` is measured here, in this
process, before the study starts (a fresh ``python -m dora_lab.study`` pays it once).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

#: (module, attribute (Class.method for a method), section): the functions timed, where they are called from
SECTIONS: list[tuple[str, str, str]] = [
    ("dora_lab.run.train", "load_model_and_tokenizer", "model load"),
    ("dora_lab.run.train", "check_model", "model check (config, tokenizer)"),
    ("dora_lab.study.trial", "check_model", "model check (config, tokenizer)"),
    ("dora_lab.run.train", "inject_adapters", "adapter injection"),
    ("dora_lab.run.train", "load_rows", "data: rows, token cache"),
    ("dora_lab.run.train", "encoded_splits", "data: rows, token cache"),
    ("dora_lab.study.trial", "load_rows", "data: rows, token cache"),
    ("dora_lab.run.train", "_loaders", "loaders, optimizer, controller set-up"),
    ("dora_lab.run.train", "build_optimizer", "loaders, optimizer, controller set-up"),
    ("dora_lab.run.train", "_controller", "loaders, optimizer, controller set-up"),
    ("dora_lab.run.train", "seed_everything", "loaders, optimizer, controller set-up"),
    ("dora_lab.run.loop", "evaluate", "evaluation"),
    ("dora_lab.run.train", "initial_evaluation", "evaluation"),
    ("dora_lab.run.loop", "_trainable_state", "run files, best weights, checkpoint"),
    ("dora_lab.run.train", "_write_outputs", "run files, best weights, checkpoint"),
    ("dora_lab.run.train", "save_adapter", "run files, best weights, checkpoint"),
    ("dora_lab.run.train", "claim_run_dir", "run files, best weights, checkpoint"),
    ("dora_lab.run.train", "train_loop", "optimizer steps"),
    ("dora_lab.track.tracker", "StudyTracker.start_trial", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.log_config", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.log_datasets", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.on_train_begin", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.on_step", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.on_evaluate", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.on_train_end", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger.finish", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.logger", "TrialLogger._artifacts", "MLflow: artifacts and figures"),
    ("dora_lab.study.runner", "post_answer", "study answer in MLflow (after every trial)"),
    ("optuna.study.study", "Study.ask", "Optuna: sampler and storage"),
    ("optuna.study.study", "Study.tell", "Optuna: sampler and storage"),
    ("optuna.trial._trial", "Trial.report", "Optuna: sampler and storage"),
    ("optuna.trial._trial", "Trial.should_prune", "Optuna: sampler and storage"),
    ("optuna.trial._trial", "Trial.set_user_attr", "Optuna: sampler and storage"),
    ("dora_lab.study.trial", "suggest", "Optuna: sampler and storage"),
    ("dora_lab.study.runner", "fail_stale", "Optuna: sampler and storage"),
    ("dora_lab.study.runner", "open_study", "Optuna: sampler and storage"),
    ("dora_lab.study.trial", "trial_config", "trial config"),
    ("dora_lab.track.tracker", "StudyTracker.parent_run", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.tracker", "StudyTracker.save_view", "MLflow: run, params, datasets, metrics"),
    ("dora_lab.track.tracker", "StudyTracker.summarize", "study summary and report (end)"),
    ("dora_lab.study.runner", "make_report", "study summary and report (end)"),
    ("dora_lab.study.runner", "print_summary", "study summary and report (end)"),
]
MAIN = "the rest (Python, the runner, glue)"


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}  # CPU: what other jobs on the machine change least


class Timer:
    """Exclusive sections on both clocks, kept per part of the study (``study start``, ``trial 0``...,
    ``study end``): ``times[clock][part][section]`` seconds.  At every event (a section entered or left,
    a part begun) the time since the last event is charged to the innermost open section in the
    current part, so a long outer section's time falls in the parts it was spent in."""

    def __init__(self) -> None:
        self.part = "study start"
        self.times: dict[str, dict[str, dict[str, float]]] = {
            c: defaultdict(lambda: defaultdict(float)) for c in CLOCKS}
        self.stack: list[str] = []
        self.last = {c: clock() for c, clock in CLOCKS.items()}
        self.trials = 0

    def _charge(self) -> None:
        now = {c: clock() for c, clock in CLOCKS.items()}
        if self.stack:
            for c in CLOCKS:
                self.times[c][self.part][self.stack[-1]] += now[c] - self.last[c]
        self.last = now

    def wrap(self, fn: Callable[..., Any], section: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._charge()
            self.stack.append(section)
            try:
                return fn(*args, **kwargs)
            finally:
                self._charge()
                self.stack.pop()
        return timed

    def next_part(self, part: str) -> None:
        self._charge()
        self.part = part


def install(timer: Timer) -> None:
    """Wrap every function of :data:`SECTIONS` where it is called from; ``Study.ask`` starts a trial's
    part, ``StudyTracker.summarize`` the study's end."""
    for module, attr, section in SECTIONS:
        try:
            owner: Any = importlib.import_module(module)
        except ImportError:  # a dora_lab from before that module (profiling an older checkout)
            continue
        *cls, name = attr.split(".")
        if cls:
            owner = getattr(owner, cls[0])
        if hasattr(owner, name):  # (the same)
            setattr(owner, name, timer.wrap(getattr(owner, name), section))
    from optuna.study import Study

    from dora_lab.track.tracker import StudyTracker

    ask, summarize = Study.ask, StudyTracker.summarize

    def ask_next(*args: Any, **kwargs: Any) -> Any:
        timer.next_part(f"trial {timer.trials}")
        timer.trials += 1
        return ask(*args, **kwargs)

    def summarize_end(*args: Any, **kwargs: Any) -> Any:
        timer.next_part("study end")
        return summarize(*args, **kwargs)

    Study.ask = ask_next  # type: ignore[method-assign]
    StudyTracker.summarize = summarize_end  # type: ignore[method-assign]


def study_argv(model: str, data: str, work: str, trials: int, steps: int, train_samples: int,
               eval_samples: int) -> list[str]:
    """``python -m dora_lab.study``'s arguments for bench_study's study, ``trials`` trials in one process."""
    from bench_study import dora_command

    ns = argparse.Namespace(model=model, data=data, work=work, steps=steps, train_samples=train_samples,
                            eval_samples=eval_samples)
    return dora_command(ns, n_trials=trials)[3:]  # without "python -m dora_lab.study"


def fractions(times: dict[str, dict[str, float]], parts: Sequence[str]) -> dict[str, float]:
    """Each section's share of the time ``parts`` took together (the shares add up to 1)."""
    total: dict[str, float] = defaultdict(float)
    for part in parts:
        for section, seconds in times.get(part, {}).items():
            total[section] += seconds
    whole = sum(total.values())
    return {k: round(v / whole, 4) for k, v in sorted(total.items(), key=lambda kv: -kv[1])} if whole else {}


def profile(argv: Sequence[str]) -> dict[str, Any]:
    """Run the study of ``argv`` in this process under the timers; seconds per part and section."""
    started = {c: clock() for c, clock in CLOCKS.items()}
    import dora_lab.run.train  # noqa: F401  (the imports a fresh study process pays before its study starts)
    import dora_lab.studies  # noqa: F401
    imports = {c: round(clock() - started[c], 3) for c, clock in CLOCKS.items()}
    timer = Timer()
    install(timer)
    from dora_lab.studies import main

    run = timer.wrap(main, MAIN)
    t0 = time.perf_counter()
    code = run(list(argv))
    if code != 0:
        raise SystemExit(f"the study failed (exit {code})")
    return {"imports_s": imports, "study_wall_s": round(time.perf_counter() - t0, 3), "trials": timer.trials,
            "seconds": {c: {p: {k: round(v, 4) for k, v in s.items()} for p, s in parts.items()}
                        for c, parts in timer.times.items()}}


def table(result: dict[str, Any], clock: str = "cpu") -> str:
    """Markdown: on ``clock``, each section's share of the first trial, of the later ones, and of the
    whole study with its imports."""
    t, n = result["seconds"][clock], result["trials"]
    first, later = fractions(t, ["trial 0"]), fractions(t, [f"trial {i}" for i in range(1, n)])
    whole = fractions({**t, "imports": {"imports": result["imports_s"][clock]}}, [*t, "imports"])
    per_trial = {p: sum(t[p].values()) for p in t if p.startswith("trial")}
    lines = [f"{clock} seconds, {n} trials in one process: imports {result['imports_s'][clock]:.1f}; study start "
             f"{sum(t.get('study start', {}).values()):.1f}; trials " + ", ".join(f"{s:.1f}" for s in per_trial.values())
             + f"; study end {sum(t.get('study end', {}).values()):.1f}", "",
             "| section | share of trial 0 | share of later trials | share of the whole study |", "|---|---:|---:|---:|"]
    for k in whole:
        lines.append(f"| {k} | {first.get(k, 0):.3f} | {later.get(k, 0):.3f} | {whole[k]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (tests/tiny.py's BERT), minilm, or a model folder")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "glue" / "cola"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="profile_study-"))
    from tiny import make_tiny_model_dir, minilm_dir

    model = {"tiny": lambda: make_tiny_model_dir(work / "tiny"), "minilm": minilm_dir}.get(
        args.model, lambda: Path(args.model))()
    result = profile(study_argv(str(model), args.data, str(work), args.trials, args.steps, args.train_samples,
                                args.eval_samples))
    result |= {"model": args.model, "steps": args.steps, "train_samples": args.train_samples,
               "eval_samples": args.eval_samples}
    print(table(result, "cpu"), table(result, "wall"), sep="\n")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
