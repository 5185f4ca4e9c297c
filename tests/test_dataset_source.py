"""``task.dataset``: instruction data from a local data file or folder, a ``save_to_disk`` folder or
a Hub id, with split names and ``task.columns``; each checked against the rows read independently
(``json`` / ``csv`` of the standard library), bad split and column names refused with the names that
exist, the Hub refused offline with one message, and a tiny Llama trained from such a dataset."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import datasets
import pytest

from dora_lab.run.config import load_config
from dora_lab.run.config_data import DatasetConfig
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.rows import DataError
from dora_lab.run.tasks import get_task
from dora_lab.run.train import main as train_main
from dora_lab.run.train import train_run
from tests.tiny import REPO, make_tiny_llama_dir

INSTRUCT = get_task("instruct")
ROWS = [{"instruction": f"What is {i} plus 1?", "output": f"{i} plus 1 is {i + 1}.", "extra": i} for i in range(10)]
RENAME = {"instruction": "prompt", "output": "response"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("dataset") / "llama")


def expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows load_splits should give: renamed, only the task's columns, idx the row number."""
    return [{"prompt": r["instruction"], "response": r["output"], "idx": i} for i, r in enumerate(rows)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(source: dict[str, Any] | str, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    return load_splits(INSTRUCT, None, dataset=DatasetConfig.model_validate(source), columns=RENAME, **kwargs)


def test_a_folder_of_jsonl_files_reads_its_named_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[7:])
    splits = load({"path": str(tmp_path / "d"), "eval_split": "test"})
    assert splits == {"train": expected(ROWS[:7]), "validation": expected(ROWS[7:])}


def test_one_csv_file_sliced_into_train_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output", "extra"])
        writer.writeheader()
        writer.writerows(ROWS)
    with path.open(newline="") as f:
        direct = list(csv.DictReader(f))
    splits = load({"path": str(path), "train_split": "train[:80%]", "eval_split": "train[80%:]"})
    assert splits["train"] == expected(direct[:8])
    assert [r["prompt"] for r in splits["validation"]] == [r["instruction"] for r in direct[8:]]


def test_a_save_to_disk_folder_and_a_parquet_file(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]),
                               "dev": datasets.Dataset.from_list(ROWS[6:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    splits = load({"path": str(tmp_path / "saved"), "eval_split": "dev"}, max_train_samples=3, seed=1)
    assert splits["validation"] == expected(ROWS[6:])
    assert len(splits["train"]) == 3 and all(r in expected(ROWS[:6]) for r in splits["train"])
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "all.parquet"))
    one = load({"path": str(tmp_path / "all.parquet"), "train_split": "train[:5]", "eval_split": "train[5:]"})
    assert one["train"] + [dict(r, idx=r["idx"] + 5) for r in one["validation"]] == expected(ROWS)


def test_a_missing_split_is_refused_with_the_splits_there(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[7:])
    with pytest.raises(DataError, match=r"has no split 'validation'; the splits there are train, test\. "
                                        r"Set task\.dataset\.eval_split"):
        load(str(tmp_path / "d"))


def test_a_missing_column_is_refused_with_the_columns_there(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "d" / "validation.jsonl", ROWS)
    with pytest.raises(DataError, match=r"has no column 'response'.*columns present: prompt, output, extra"):
        load_splits(INSTRUCT, None, dataset=DatasetConfig(path=str(tmp_path / "d")), columns={"instruction": "prompt"})


def test_a_hub_id_offline_gives_one_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"task.dataset 'tatsu-lab/alpaca' is not a local file or folder .* "
                                        r"could not be loaded from the Hugging Face Hub: HF_HUB_OFFLINE is set"):
        load("tatsu-lab/alpaca")


def test_data_dir_and_dataset_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="both name the data; set one of them"):
        load_splits(INSTRUCT, tmp_path, dataset=DatasetConfig(path=str(tmp_path)))


def test_the_config_takes_a_string_or_a_mapping_and_checks_eval_split_count() -> None:
    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", ["task.data_dir=null", "task.dataset=a/b"])
    assert cfg.task.dataset == DatasetConfig(path="a/b")
    with pytest.raises(ConfigError, match="task.dataset.trainsplit"):
        load_config(REPO / "configs" / "smollm2_instruct.yaml", ["task.dataset={path: a/b, trainsplit: x}"])
    with pytest.raises(ValueError, match="names 2 split.*evaluates 1"):
        DatasetConfig(path="a", eval_split=["x", "y"]).split_names(("validation",))


def test_a_bad_split_exits_2_before_any_work(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    sets = ["task.data_dir=null", f"task.dataset={{path: {tmp_path / 'd'}, eval_split: dev}}",
            f"output_dir={tmp_path / 'out'}", f"model.name={llama}"]
    code = train_main([str(REPO / "configs" / "smollm2_instruct.yaml"), *[x for s in sets for x in ("--set", s)]])
    assert code == 2
    err = capsys.readouterr().err
    assert "has no split 'dev'; the splits there are train" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_tiny_llama_trains_from_a_dataset_file(llama: Path, tmp_path: Path) -> None:
    shipped = [json.loads(line) for line in (REPO / "data" / "instruct" / "train.jsonl").read_text().splitlines()]
    rows = [{"instruction": r["prompt"], "output": r["response"]} for r in shipped[:48]]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "set.parquet"))
    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", [
        f"model.name={llama}", f"output_dir={tmp_path}", "task.data_dir=null",
        f"task.dataset={{path: {tmp_path / 'set.parquet'}, train_split: 'train[:40]', eval_split: 'train[40:]'}}",
        "task.columns={instruction: prompt, output: response}", "task.max_length=96", "train.max_steps=6",
        "train.batch_size=8", "train.eval_every=3", "schedule.interval=1", "train.lr=0.05"])
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert math.isfinite(result.history[-1]["perplexity"])
    assert result.history[-1]["perplexity"] < result.initial_metrics["perplexity"]


def test_mlflow_records_the_dataset_path_as_each_split_source(tmp_path: Path) -> None:
    from dora_lab.track.logger import datasets as mlflow_datasets

    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[7:])
    cfg = load_config(REPO / "configs" / "smollm2_instruct.yaml", [
        "task.data_dir=null", f"task.dataset={{path: {tmp_path / 'd'}, eval_split: test}}",
        "task.columns={instruction: prompt, output: response}"])
    out = mlflow_datasets(cfg)
    assert set(out) == {"train", "validation"} and len(out["validation"].df) == 3
    assert all(str((tmp_path / "d").resolve()) in json.dumps(ds.source.to_dict()) for ds in out.values())


def test_a_file_datasets_cannot_parse_is_refused_with_the_parsers_reason(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"could not be read as a dataset \(ArrowInvalid: JSON parse error"):
        load(str(tmp_path / "d"))
