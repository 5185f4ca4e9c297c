"""Loading splits: the real shared CoLA, local jsonl/csv/tsv files, and every error message."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from dora_lab.run.data import GLUE_SPLIT_FILES, load_splits
from dora_lab.run.rows import DataError
from dora_lab.run.tasks import get_task
from tests.tiny import COLA as TINY_COLA

COLA_DIR = TINY_COLA  # tests/tiny.py: ../shared, or DORA_LAB_TEST_COLA
needs_cola = pytest.mark.skipif(
    not (COLA_DIR / "train.jsonl").is_file(), reason=f"shared GLUE CoLA not found at {COLA_DIR}"
)

MRPC_TRAIN = [
    {"sentence1": "The cat sat.", "sentence2": "A cat was sitting.", "label": 1, "idx": 0},
    {"sentence1": 'He said "no".', "sentence2": "He agreed, loudly.", "label": 0, "idx": 1},
    {"sentence1": "Prices rose 5%.", "sentence2": "Prices went up by 5 percent.", "label": 1, "idx": 2},
]
MRPC_VALID = [{"sentence1": "It rained.", "sentence2": "The sun shone.", "label": 0, "idx": 0}]


def write(folder: Path, split: str, rows: list[dict[str, Any]], fmt: str, header: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    columns = list(rows[0])
    with path.open("w", newline="") as f:
        if fmt == "csv":
            writer = csv.writer(f)
        else:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None)
        if header:
            writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in rows])
    return path


def mrpc_dir(tmp_path: Path, fmt: str = "jsonl", train: list[dict[str, Any]] | None = None) -> Path:
    folder = tmp_path / "mrpc"
    write(folder, "train", MRPC_TRAIN if train is None else train, fmt)
    write(folder, "validation", MRPC_VALID, fmt)
    return folder


@needs_cola
def test_real_cola_counts() -> None:
    splits = load_splits(get_task("cola"), COLA_DIR)
    assert set(splits) == {"train", "validation"}
    assert len(splits["train"]) == 8551 and len(splits["validation"]) == 1043
    assert sum(r["label"] for r in splits["train"]) == 6023
    assert sum(r["label"] for r in splits["validation"]) == 721
    first = splits["train"][0]
    assert first == {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1, "idx": 0}


@needs_cola
def test_subsets_are_seeded_and_keep_file_order() -> None:
    spec = get_task("cola")
    full = load_splits(spec, COLA_DIR)
    a = load_splits(spec, COLA_DIR, max_train_samples=50, max_eval_samples=20, seed=3)
    b = load_splits(spec, COLA_DIR, max_train_samples=50, max_eval_samples=20, seed=3)
    c = load_splits(spec, COLA_DIR, max_train_samples=50, max_eval_samples=20, seed=4)
    assert (len(a["train"]), len(a["validation"])) == (50, 20)
    assert a == b and a["train"] != c["train"]
    ids = [r["idx"] for r in a["train"]]
    assert ids == sorted(ids) and all(full["train"][i] == r for i, r in zip(ids, a["train"], strict=True))
    # A limit at or above the split's size keeps everything.
    assert len(load_splits(spec, COLA_DIR, max_eval_samples=5000)["validation"]) == 1043


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_pair_task_from_local_files(tmp_path: Path, fmt: str) -> None:
    splits = load_splits(get_task("mrpc"), mrpc_dir(tmp_path, fmt))
    assert splits == {"train": MRPC_TRAIN, "validation": MRPC_VALID}
    assert all(type(r["label"]) is int for r in splits["train"])


def test_headerless_tsv_is_text_fields_then_label(tmp_path: Path) -> None:
    rows = [{k: r[k] for k in ("sentence1", "sentence2", "label")} for r in MRPC_TRAIN]
    folder = tmp_path / "mrpc"
    write(folder, "train", rows, "tsv", header=False)
    write(folder, "validation", MRPC_VALID, "tsv")
    train = load_splits(get_task("mrpc"), folder)["train"]
    assert [(r["sentence1"], r["label"], r["idx"]) for r in train] == [
        (r["sentence1"], r["label"], i) for i, r in enumerate(rows)]


def test_mnli_and_stsb_local(tmp_path: Path) -> None:
    pair = {"premise": "A man sleeps.", "hypothesis": "A man is awake."}
    for split in ("train", "validation_matched", "validation_mismatched"):
        write(tmp_path / "mnli", split, [{**pair, "label": 2}, {**pair, "label": 0}], "jsonl")
    splits = load_splits(get_task("mnli"), tmp_path / "mnli")
    assert set(splits) == {"train", "validation_matched", "validation_mismatched"}

    sts = [{"sentence1": "a", "sentence2": "b", "label": v} for v in ("4.2", "0", "5.0")]
    for split in ("train", "validation"):
        write(tmp_path / "stsb", split, sts, "csv")
    labels = [r["label"] for r in load_splits(get_task("stsb"), tmp_path / "stsb")["train"]]
    assert labels == [4.2, 0.0, 5.0] and all(type(v) is float for v in labels)


# -- GLUE's own files, as downloaded ----------------------------------------------------------------
GLUE_TSV = Path(__file__).parent / "data" / "glue_tsv"  # real rows: see its README.md
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
                "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE"}
# (split, text field, labels in file order, that field of the first row) per task and split
GLUE_EXPECTED: dict[str, dict[str, tuple[str, list[Any], str]]] = {
    "cola": {"train": ("sentence", [1] * 18 + [0],
                       "Our friends won't buy this analysis, let alone the next one we propose.")},
    "sst2": {"validation": ("sentence", [1, 0, 1, 0], "it 's a charming and often affecting journey . ")},
    "mrpc": {"train": ("sentence1", [1, 0, 1, 0], 'Amrozi accused his brother , whom he called " the witness " '
                       ', of deliberately distorting his evidence .'),
             "validation": ("sentence2", [1, 0, 0, 1], '" The foodservice pie business does not fit our '
                            'long-term growth strategy .')},
    "stsb": {"train": ("sentence2", [5.0, 3.8, 3.8, 2.6], "An air plane is taking off."),
             "validation": ("sentence1", [5.0, 4.75, 5.0, 2.4], "A man with a hard hat is dancing.")},
    "qqp": {"validation": ("question1", [0, 0, 1, 0], "Why are African-Americans so beautiful?")},
    "mnli": {"validation_matched": ("hypothesis", [1], "Everyone really likes the newest benefits ")},
    "qnli": {"train": ("question", [1, 1], "When did the third Digimon series begin?"),
             "validation": ("sentence", [0], "As of that day, the new constitution heralding the Second "
                            "Republic came into force.")},
    "rte": {"train": ("sentence2", [0, 1, 0, 0, 1], "Pope Benedict XVI is the new leader of the Roman "
                      "Catholic Church.")},
}


def glue_folder(tmp_path: Path, task: str) -> Path:
    """A copy of the task's GLUE fixture; a split whose file was not found in public copies gets
    another split's file (same layout), so every split the task needs is there."""
    folder = shutil.copytree(GLUE_TSV / GLUE_FOLDERS[task], tmp_path / GLUE_FOLDERS[task])
    names = ["train.tsv"] + [f"{GLUE_SPLIT_FILES[s]}.tsv" for s in get_task(task).eval_splits]
    present = sorted(p for p in folder.iterdir() if p.name in names)
    for name in names:
        if not (folder / name).is_file():
            shutil.copy(present[0], folder / name)
    return folder


@pytest.mark.parametrize("task", list(GLUE_EXPECTED))
def test_glue_files_load_as_downloaded(tmp_path: Path, task: str) -> None:
    splits = load_splits(get_task(task), glue_folder(tmp_path, task))
    assert set(splits) == {"train", *get_task(task).eval_splits}
    for split, (field, labels, first) in GLUE_EXPECTED[task].items():
        rows = splits[split]
        assert [r["label"] for r in rows] == labels
        assert rows[0][field] == first
        assert [r["idx"] for r in rows] == list(range(len(rows)))
        assert set(rows[0]) == {*get_task(task).columns, "idx"}


def test_glue_mnli_maps_its_columns_and_gold_label(tmp_path: Path) -> None:
    row = load_splits(get_task("mnli"), glue_folder(tmp_path, "mnli"))["validation_mismatched"][0]
    # label1..label5 are the annotators' votes; gold_label is the label (neutral is 1 on the Hub)
    assert row == {"premise": "The new rights are nice enough",
                   "hypothesis": "Everyone really likes the newest benefits ", "label": 1, "idx": 0}


def test_label_names_in_any_format_and_bad_names(tmp_path: Path) -> None:
    rows = [{"sentence1": "a", "sentence2": "b", "label": name} for name in ("not_entailment", " entailment")]
    for split in ("train", "validation"):
        write(tmp_path / "rte", split, rows, "jsonl")
    assert [r["label"] for r in load_splits(get_task("rte"), tmp_path / "rte")["train"]] == [1, 0]
    write(tmp_path / "rte", "train", [{**rows[0], "label": "contradiction"}], "jsonl")
    with pytest.raises(DataError, match=r"row 1 has label 'contradiction'; rte labels must be integers in "
                                        r"\[0, 2\) \(0..1\) or the names entailment, not_entailment"):
        load_splits(get_task("rte"), tmp_path / "rte")


def test_glue_and_hub_file_names_for_one_split_clash(tmp_path: Path) -> None:
    folder = mrpc_dir(tmp_path)
    shutil.copy(GLUE_TSV / "MRPC" / "dev.tsv", folder / "dev.tsv")
    with pytest.raises(DataError, match="more than one file for split 'validation': validation.jsonl, dev.tsv"):
        load_splits(get_task("mrpc"), folder)


def test_glue_header_beside_the_hub_name_keeps_the_hub_column(tmp_path: Path) -> None:
    # a file with both "score" and "label": "label" is the label, "score" an extra column
    rows = [{"sentence1": "a", "sentence2": "b", "score": "9.0", "label": "1.5"}]
    for split in ("train", "validation"):
        write(tmp_path / "stsb", split, rows, "tsv")
    assert load_splits(get_task("stsb"), tmp_path / "stsb")["train"][0]["label"] == 1.5


# -- error messages ------------------------------------------------------------------------------
def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"task.data_dir '.*nowhere' does not exist.*--set task.data_dir="):
        load_splits(get_task("cola"), tmp_path / "nowhere")


def test_missing_split_file_names_expected_and_found(tmp_path: Path) -> None:
    write(tmp_path, "train", MRPC_TRAIN, "jsonl")
    write(tmp_path, "valid", MRPC_VALID, "tsv")
    with pytest.raises(DataError) as err:
        load_splits(get_task("mrpc"), tmp_path)
    msg = str(err.value)
    assert "validation.jsonl or validation.csv or validation.tsv or dev.tsv" in msg
    assert "files found: train.jsonl, valid.tsv" in msg


def test_two_files_for_one_split(tmp_path: Path) -> None:
    folder = mrpc_dir(tmp_path)
    write(folder, "train", MRPC_TRAIN, "csv")
    with pytest.raises(DataError, match="more than one file for split 'train': train.jsonl, train.csv"):
        load_splits(get_task("mrpc"), folder)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_missing_column_names_it_and_those_present(tmp_path: Path, fmt: str) -> None:
    rows = [{"sentence1": r["sentence1"], "text_b": r["sentence2"], "label": r["label"]} for r in MRPC_TRAIN]
    with pytest.raises(DataError) as err:
        load_splits(get_task("mrpc"), mrpc_dir(tmp_path, fmt, train=rows))
    msg = str(err.value)
    assert f"train.{fmt} has no column 'sentence2'" in msg
    assert "columns present: sentence1, text_b, label" in msg
    assert ("without a header row must hold exactly sentence1, sentence2, label" in msg) == (fmt == "tsv")


def test_headerless_tsv_with_other_columns_says_to_add_a_header(tmp_path: Path) -> None:
    folder = tmp_path / "cola"
    write(folder, "train", [{"source": "gj04", "label": 1, "sentence": "Fine."}], "tsv", header=False)
    write(folder, "validation", [{"sentence": "Fine.", "label": 1}], "tsv")
    with pytest.raises(DataError, match=r"train.tsv has no column 'sentence'.*columns present: gj04, 1, Fine\.") as err:
        load_splits(get_task("cola"), folder)
    assert "or GLUE's source, label, original_label, sentence" in str(err.value)


@pytest.mark.parametrize(
    ("task", "bad", "match"),
    [
        ("mrpc", 2, r"row 2 has label 2; mrpc labels must be integers in \[0, 2\)"),
        ("mrpc", 0.5, r"row 2 has label 0.5; mrpc labels must be integers"),
        ("mrpc", "yes", r"row 2 has label 'yes'"),
        ("mrpc", -1, r"-1 marks GLUE's unlabelled test split"),
        ("stsb", 7.5, r"row 2 has label 7.5; stsb labels must be numbers in \[0, 5\]"),
    ],
)
def test_bad_label(tmp_path: Path, task: str, bad: Any, match: str) -> None:
    rows = [dict(r) for r in MRPC_TRAIN]
    rows[1]["label"] = bad
    folder = tmp_path / task
    write(folder, "train", rows, "jsonl")
    write(folder, "validation", MRPC_VALID, "jsonl")
    with pytest.raises(DataError, match=match) as err:
        load_splits(get_task(task), folder)
    assert "set task.name" in str(err.value)


def test_bad_label_in_csv_names_the_row(tmp_path: Path) -> None:
    rows = [dict(r) for r in MRPC_TRAIN]
    rows[2]["label"] = 3
    with pytest.raises(DataError, match=r"train.csv row 3 has label '3'"):
        load_splits(get_task("mrpc"), mrpc_dir(tmp_path, "csv", train=rows))


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="choose one of: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte"):
        get_task("glue")


def test_offline_hub_fails_fast_and_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A repository that is in no cache, so the test holds even where GLUE was downloaded before.
    spec = dataclasses.replace(get_task("cola"), hub_path=("dora-lab/no-such-dataset", "cola"))
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_splits(spec, None)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "could not load GLUE cola from the Hugging Face Hub" in msg
    assert "Set task.data_dir to a local folder with train and validation files (.jsonl, .csv or .tsv" in msg
    assert "--set task.data_dir=../shared/data/glue/cola" in msg


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_train_samples must be a positive integer"):
        load_splits(get_task("cola"), COLA_DIR, max_train_samples=0)
