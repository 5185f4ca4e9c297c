"""Load a task's splits, from the Hugging Face Hub or from local files, as checked rows.

:func:`load_splits` returns ``{"train": rows, <each eval split>: rows}``, every row a dict with
the task's text fields, ``label`` (an ``int`` in ``[0, num_labels)``, or for a regression a
``float`` in the task's ``label_range``, ``[0, 5]`` for stsb) and ``idx``.  Everything
task-specific comes from the :class:`~dora_lab.run.tasks.TaskSpec`.  Instruction data (a causal
task without labels) has rows ``{prompt, response, idx}``, chat data ``{messages, idx}`` (a row's
``system`` text becomes its first turn: :func:`~dora_lab.run.causal.chat_messages`); a GLUE task asked as a prompt reads the
GLUE task's own files.  ``task.columns`` renames a file's columns to the task's.  Hub data and
local files go through the same checks (:mod:`dora_lab.run.rows`), so a bad file fails at load time
with a message that names the file, the row and what to fix.  The Hub, and ``task.dataset`` (a Hub
id or any local data path, read by ``datasets``), are :mod:`dora_lab.run.hub_data`'s; local folders
(``task.data_dir``) are read here, by the rules below.

Local folders hold one file per split, ``<split>.jsonl``, ``<split>.csv`` or ``<split>.tsv``
(``train`` and ``validation``; mnli wants ``validation_matched`` and ``validation_mismatched``)
with the columns of ``nyu-mll/glue``.  CSV files need a header row; TSV files may have one
(without one, the columns are the text fields then ``label``, in that order).

GLUE's own files load as downloaded: ``dev.tsv`` (mnli: ``dev_matched.tsv``,
``dev_mismatched.tsv``) is the validation split, the task's GLUE columns are renamed to the Hub's
(:attr:`~dora_lab.run.tasks.TaskSpec.glue_columns`, e.g. MRPC's ``Quality`` / ``#1 String``), CoLA's
header-less four-column files are recognised, and class names (``entailment``, ...) become ids
in the Hub's order (:attr:`~dora_lab.run.tasks.TaskSpec.label_names`).  TSV files are read with
quoting off, as GLUE writes them: a ``"`` is an ordinary character.

Batching lives in :mod:`dora_lab.run.batching` (:func:`~dora_lab.run.batching.make_loader`,
:func:`~dora_lab.run.batching.padding_stats`, :func:`~dora_lab.run.batching.restore_order`): import it from there.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .hub_data import load_dataset_splits, load_hub_splits
from .rows import DataError, Row, check_columns, normalise, parse_label, renamed, subset
from .tasks import LABEL_COLUMN, TaskSpec

if TYPE_CHECKING:
    from .config_data import DatasetConfig

__all__ = ["GLUE_SPLIT_FILES", "SUFFIXES", "load_splits"]

#: File types read from ``task.data_dir``, in order of preference.
SUFFIXES = (".jsonl", ".csv", ".tsv")
#: The names GLUE's download gives the evaluation splits' files (``<name>.tsv``).
GLUE_SPLIT_FILES = {"validation": "dev", "validation_matched": "dev_matched",
                    "validation_mismatched": "dev_mismatched"}


# -- public entry point ------------------------------------------------------------------------
def load_splits(
    spec: TaskSpec,
    data_dir: str | Path | None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
    dataset: DatasetConfig | None = None,
) -> dict[str, list[Row]]:
    """Rows of ``train`` and of each of ``spec.eval_splits``, checked and normalised.

    ``columns`` (config key ``task.columns``) renames the data's columns to the task's before the
    checks, e.g. ``{"instruction": "prompt", "output": "response"}`` for instruction data whose
    files name them otherwise.  Instruction rows (``spec.is_instruction``) have no label: each is
    ``{prompt, response, idx}``.

    ``data_dir=None`` loads ``datasets.load_dataset(*spec.hub_path)``; offline (no network, or
    ``HF_HUB_OFFLINE=1``) that fails at once with a :class:`DataError` that says to set
    ``task.data_dir``.  A folder reads ``<split>.jsonl|.csv|.tsv`` from it.  ``dataset`` (config
    key ``task.dataset``, with ``data_dir`` None) reads a Hub dataset or a local path through
    ``datasets`` instead (:func:`~dora_lab.run.hub_data.load_dataset_splits`).

    ``max_train_samples`` / ``max_eval_samples`` keep a random subset of that many rows of each
    split (the same rows for the same ``seed``, kept in file order), for tests and fast runs.
    """
    limits = {"train": max_train_samples, **dict.fromkeys(spec.eval_splits, max_eval_samples)}
    for split, limit in limits.items():
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            which = "max_train_samples" if split == "train" else "max_eval_samples"
            raise ValueError(f"{which} must be a positive integer or None, got {limit!r}")
    renames = dict(columns or {})
    bad = [f"{k!r}: {v!r}" for k, v in renames.items() if not isinstance(k, str) or v not in spec.columns]
    if bad:
        raise DataError(f"task.columns maps {', '.join(bad)}: each entry maps a column of the data to one of "
                        f"{spec.name}'s columns ({', '.join(spec.columns)}); fix task.columns")
    if dataset is not None and data_dir is not None:
        raise DataError(f"task.data_dir ({data_dir}) and task.dataset ({dataset.path}) both name the data; "
                        f"set one of them (task.dataset reads a Hub id or any local data path)")
    if dataset is not None:
        return load_dataset_splits(spec, dataset, limits, seed, renames)
    if data_dir is None:
        return load_hub_splits(spec, limits, seed, renames)
    return _load_local(spec, Path(data_dir), limits, seed, renames)


# -- local files -------------------------------------------------------------------------------
def _load_local(
    spec: TaskSpec, data_dir: Path, limits: dict[str, int | None], seed: int, renames: dict[str, str]
) -> dict[str, list[Row]]:
    folder = data_dir.expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(
            f"task.data_dir {str(data_dir)!r} {what} (resolved to {folder.resolve()}); set task.data_dir to "
            f"a folder with train and validation files (.jsonl, .csv or .tsv), "
            f"e.g. --set task.data_dir=../shared/data/glue/{spec.name}"
        )
    out: dict[str, list[Row]] = {}
    for split, limit in limits.items():
        path = _split_file(spec, folder, split)
        columns, raw = _read_table(spec, path)
        columns, raw = [renames.get(c, c) for c in columns], renamed(raw, renames)
        if not raw and not any(columns):  # an empty file has no columns either, and they are not what to fix
            raise DataError(f"{path} is empty (no rows); it should hold {spec.name}'s {split} rows with "
                            f"columns {', '.join(spec.columns)}")
        check_columns(spec, columns, str(path), tsv=path.suffix == ".tsv")
        rows = normalise(spec, raw, str(path), None)
        keep = subset(len(rows), limit, seed)
        out[split] = rows if keep is None else [rows[i] for i in keep]
    return out


def _split_file(spec: TaskSpec, folder: Path, split: str) -> Path:
    names = [f"{split}{suffix}" for suffix in SUFFIXES]
    if split in GLUE_SPLIT_FILES:
        names.append(f"{GLUE_SPLIT_FILES[split]}.tsv")
    found = [folder / name for name in names if (folder / name).is_file()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(
            f"{folder} holds more than one file for split {split!r}: {', '.join(p.name for p in found)}; "
            f"keep one of them"
        )
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    expected = " or ".join(names)
    raise DataError(
        f"task.data_dir {folder} has no file for split {split!r} of {spec.name}: expected {expected}; "
        f"files found: {', '.join(present) if present else '(none)'}. "
        f"{spec.name} needs {', '.join(('train', *spec.eval_splits))}"
    )


def _read_table(spec: TaskSpec, path: Path) -> tuple[list[str], list[Row]]:
    """The column names and the rows of one file (values as read: strings for CSV/TSV)."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f, _decoding(path):
        # GLUE's own TSVs contain bare quote characters: read them literally.
        if delimiter == "\t":
            table = list(csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE))
        else:
            table = list(csv.reader(f))
    if not table:
        raise DataError(f"{path} is empty")
    header = [c.strip() for c in table[0]]
    body = table[1:]
    # A TSV has no header row when its first row looks like data: not the column names, and the
    # fields of a header-less layout (the task's columns, or GLUE's own, e.g. CoLA's) with a valid
    # label in its place.  Otherwise it is a header, checked later.
    if path.suffix == ".tsv" and not set(spec.columns) <= set(header):
        layout = _headerless_layout(spec, header)
        if layout is not None:
            header, body = list(layout), table
    header = _hub_names(spec, header)
    rows: list[Row] = []
    for number, values in enumerate(body, start=1):
        if not values:  # a blank line
            continue
        if len(values) != len(header):
            raise DataError(
                f"{path} row {number} has {len(values)} fields but the header has {len(header)} "
                f"({', '.join(header)}); fix that row"
            )
        rows.append(dict(zip(header, values, strict=True)))
    return header, rows


def _headerless_layout(spec: TaskSpec, first: Sequence[str]) -> tuple[str, ...] | None:
    """The columns of a header-less file whose first row is ``first``, or None if it is a header."""
    for layout in (spec.columns, spec.glue_headerless):
        if (layout and len(first) == len(layout)
                and parse_label(spec, first[layout.index(LABEL_COLUMN)]) is not None):
            return layout
    return None


def _hub_names(spec: TaskSpec, header: list[str]) -> list[str]:
    """``header`` with GLUE's column names renamed to the Hub's, when it is GLUE's layout: it
    lacks some of the task's columns and has every GLUE column (``#1 String``, ``gold_label``...).
    A name whose Hub name is already in the header is kept."""
    renames = dict(spec.glue_columns)
    if not renames or set(spec.columns) <= set(header) or not set(renames) <= set(header):
        return header
    return [renames[c] if c in renames and renames[c] not in header else c for c in header]


def _read_jsonl(path: Path) -> tuple[list[str], list[Row]]:
    rows: list[Row] = []
    columns: dict[str, None] = {}
    with path.open(encoding="utf-8") as f, _decoding(path):
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}); fix that line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is not a JSON object (one row per line)")
            if not columns:
                columns = dict.fromkeys(row)
            rows.append(row)
    return list(columns), rows


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn a ``UnicodeDecodeError`` while reading ``path`` into a :class:`DataError` that names the
    file, the line and the byte (the error's own position is within a read buffer, not the file)."""
    try:
        yield
    except UnicodeDecodeError as exc:
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise DataError(
                    f"{path} line {number} is not UTF-8 text (byte {line[bad.start]:#04x} at column "
                    f"{bad.start + 1}); save the file as UTF-8"
                ) from exc
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); save the file as UTF-8") from exc
