"""The shipped decoder configs end to end on a tiny random Llama saved to a folder (model.name =
that folder): configs/smollm2_cola.yaml (CoLA as prompts) with its LoRA arm and its report, and
configs/smollm2_instruct.yaml (the shipped instruction set), through the real study runner and
``python -m dora_lab.report``, as the README's commands run them.  Also runs and refusals of
causal tasks through ``dora_lab.train``."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from tiny import COLA, make_tiny_llama_dir, make_tiny_model_dir

from dora_lab.plan.setup import prepare
from dora_lab.report import compare as report
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.train import main as train_main
from dora_lab.run.train import train_run
from dora_lab.studies import main as study_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# the tiny Llama: 2 layers x (q 65 + k 49 + v 49 + o 65 + gate 97 + up 97 + down 97) = 1,038 parameters per rank
PER_RANK = 1038

needs_cola = pytest.mark.skipif(not (COLA / "train.jsonl").is_file(), reason=f"shared CoLA not found at {COLA}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    threads, old = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    root = tmp_path_factory.mktemp("causal")
    yield {"root": root, "llama": make_tiny_llama_dir(root / "llama"), "out": root / "out"}
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old


def tiny_sets(env: dict[str, Any], *extra: str) -> list[str]:
    return [f"model.name={env['llama']}", f"output_dir={env['out']}", "task.max_length=256",
            "task.max_train_samples=32", "task.max_eval_samples=16", "train.max_steps=8", "train.batch_size=4",
            "train.eval_every=4", "schedule.interval=1", "train.lr=0.01", *extra]


def as_args(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def trial_metrics(env: dict[str, Any], name: str) -> list[tuple[optuna.trial.FrozenTrial, dict[str, Any]]]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{env['out'] / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return [(t, json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())) for t in done]


@needs_cola
def test_smollm2_cola_study_both_arms_and_report(env: dict[str, Any]) -> None:
    sets = tiny_sets(env, f"task.data_dir={COLA}", f"budget.target_params={2 * PER_RANK}")
    assert study_main([str(CONFIGS / "smollm2_cola.yaml"), *as_args(sets)]) == 0
    lora = [s for s in sets if not s.startswith("budget.")]  # the arm sets its own budget
    assert study_main([str(REPO / "studies" / "smollm2_cola_lora.yaml"), *as_args(lora)]) == 0
    dora, plain = trial_metrics(env, "smollm2_cola"), trial_metrics(env, "smollm2_cola_lora")
    assert len(dora) == len(plain) == 3
    for _, metrics in plain:
        assert metrics["adapter_parameters_final"] == 2 * PER_RANK  # LoRA at rank 2
    for _, metrics in dora:  # the budget, to within one component (the largest holds 32 + 64 + 1)
        assert 2 * PER_RANK - 97 < metrics["adapter_parameters_final"] <= 2 * PER_RANK
    for trial, metrics in dora + plain:
        assert metrics["metric"] == "matthews_correlation" and set(metrics["final"]) >= {"matthews_correlation",
                                                                                          "accuracy"}
        assert trial.value == metrics["final"]["matthews_correlation"]  # study.objective: final
        assert metrics["data"]["validation"]["examples"] == 16
    out = env["root"] / "report"
    assert report.main([str(CONFIGS / "smollm2_cola.yaml"), *as_args(sets), "--out", str(out), "--no-mlflow"]) == 0
    groups = {g["group"]: g for g in read_csv(out / "groups.csv")}
    assert set(groups) == {"dora", "constant"} and groups["constant"]["is_reference"] == "True"
    for name, arm in (("dora", dora), ("constant", plain)):
        assert float(groups[name]["mean"]) == pytest.approx(sum(t.value for t, _ in arm) / 3)
        assert groups[name]["n"] == "3" and groups[name]["seeds"] == "0 1 2"
    assert {r["group"] for r in read_csv(out / "comparisons.csv")} == {"dora"}  # dora - constant, paired by seed
    assert "matthews_correlation" in (out / "report.md").read_text()


def test_smollm2_instruct_study_minimises_perplexity_and_reports(env: dict[str, Any]) -> None:
    sets = tiny_sets(env, f"task.data_dir={REPO / 'data' / 'instruct'}")
    assert study_main([str(CONFIGS / "smollm2_instruct.yaml"), *as_args(sets)]) == 0
    done = trial_metrics(env, "smollm2_instruct")
    assert sorted(t.params["scorer.name"] for t, _ in done) == ["magnitude", "sensitivity"]
    for trial, metrics in done:
        eligible = [h for h in metrics["history"] if h["step"] >= 8 * (1 - 0.4)]  # once the mask is frozen
        assert trial.value == pytest.approx(min(h["perplexity"] for h in eligible))  # lower is better
        assert metrics["best"] == pytest.approx(trial.value)
        for h in metrics["history"]:
            assert h["perplexity"] == pytest.approx(math.exp(h["loss"]))
        assert metrics["data"]["train"] == {"examples": 32, "prompts_cut": 0, "answers_dropped": 0}
    out = env["root"] / "report-instruct"
    args = [str(CONFIGS / "smollm2_instruct.yaml"), *as_args(sets), "--out", str(out), "--no-mlflow"]
    assert report.main(args) == 0
    assert len(read_csv(out / "groups.csv")) == 2 and "perplexity" in (out / "report.md").read_text()


def test_a_maximised_perplexity_is_refused(env: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="study.direction is 'maximize' but the study's metric 'perplexity' is "
                                          "better when lower; set study.direction: minimize"):
        prepare(CONFIGS / "smollm2_instruct.yaml", ["study.direction=maximize"])


# -- runs and refusals through dora_lab.train -----------------------------------------------------
def test_prompts_cut_are_logged_and_counted(env: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(CONFIGS / "smollm2_instruct.yaml", tiny_sets(
        env, f"task.data_dir={REPO / 'data' / 'instruct'}", "task.max_length=40", "train.max_steps=2"))
    result = train_run(cfg, tmp_path / "run", progress=False)
    counts = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert counts == result.data and counts["train"]["prompts_cut"] > 0
    assert counts["train"]["examples"] == 32 and counts["validation"]["examples"] == 16
    err = capsys.readouterr().err
    assert f"train: {counts['train']['prompts_cut']} of 32 prompts cut from the left to fit task.max_length=40" in err


def test_a_causal_task_on_a_classifier_is_refused_before_the_data(env: dict[str, Any], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bert = make_tiny_model_dir(tmp_path / "bert")
    missing = tmp_path / "no-such-data"  # never read: the model is refused first
    sets = [*tiny_sets(env, f"task.data_dir={missing}"), f"model.name={bert}"]
    cfg = load_config(CONFIGS / "smollm2_cola.yaml", sets)
    with pytest.raises(ConfigError, match=r"task.name 'cola_prompt' is a causal task .* model.name .* is not a causal "
                                          r"language model \(model_type 'bert', saved as BertForSequenceClassification\)"
                                          r".*or task.name to 'cola'"):
        train_run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert train_main([str(CONFIGS / "smollm2_cola.yaml"), *as_args(sets), "--run-dir", str(tmp_path / "r")]) == 2
    assert "is a causal task" in capsys.readouterr().err


def test_a_classifier_task_on_a_decoder_needs_its_new_head_trainable(env: dict[str, Any], tmp_path: Path) -> None:
    sets = [f"model.name={env['llama']}", f"task.data_dir={COLA}", "task.max_train_samples=16",
            "task.max_eval_samples=8", "train.max_steps=2", "train.batch_size=4", "schedule.name=constant"]
    cfg = load_config(CONFIGS / "cola.yaml", sets)  # model.trainable: [classifier, pooler], BERT's head
    with pytest.raises(ConfigError, match=r"model.trainable \['classifier', 'pooler'\] leaves the classification head"
                                          r" of .* \(score\) frozen.*--set model.trainable=\[score\]"):
        train_run(cfg, tmp_path / "refused", progress=False)
    if not (COLA / "train.jsonl").is_file():
        return
    # with its head trainable, the decoder trains as a classifier (its pad token set from eos)
    result = train_run(load_config(CONFIGS / "cola.yaml", [*sets, "model.trainable=[score]"]), tmp_path / "ok",
                       progress=False)
    assert result.metric_name == "matthews_correlation" and not result.data


def test_a_model_type_without_a_classifier_class_is_refused_for_a_glue_task(tmp_path: Path) -> None:
    from tiny import make_tiny_tokenizer
    from transformers import CodeGenConfig

    from dora_lab.run.models import check_model
    from dora_lab.run.tasks import get_task

    folder = tmp_path / "codegen"
    CodeGenConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=384).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"task.name 'cola' trains a sequence-classification head, but model.name "
                                          r".* has no sequence-classification class in transformers; set task.name "
                                          r"to 'cola_prompt'"):
        check_model(str(folder), task=get_task("cola"), trainable=["classifier"])
    check_model(str(folder), task=get_task("cola_prompt"))  # the same model asked the task as a prompt is fine
