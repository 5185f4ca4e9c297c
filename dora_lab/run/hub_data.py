"""Rows from ``datasets``: GLUE from the Hugging Face Hub (``task.data_dir: null``) and any dataset
named by ``task.dataset`` (a Hub id, a local data file or folder, a ``save_to_disk`` folder).

Both go through the checks of :mod:`dora_lab.run.rows`.  Offline (no network, or
``HF_HUB_OFFLINE=1``), a Hub load fails at once with one :class:`~dora_lab.run.rows.DataError` that
says the Hub is not reachable and what to set instead, rather than ``datasets``' slow retries.
A ``task.dataset`` split or column that does not exist is refused, naming those that do, when the
data is loaded (before the model, before any training).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rows import DataError, Row, check_columns, normalise, renamed, subset
from .tasks import TaskSpec

if TYPE_CHECKING:
    from .config_data import DatasetConfig

__all__ = ["FILE_BUILDERS", "load_dataset_splits", "load_hub_splits"]

_TRUE = {"1", "ON", "YES", "TRUE"}
#: ``datasets``' builder and its options for each data file type a ``task.dataset`` path may be.
FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
}


def _hub_help(spec: TaskSpec, reason: str) -> str:
    files = ", ".join(f"{s}.jsonl" for s in ("train", *spec.eval_splits))
    return (
        f"could not load GLUE {spec.name} from the Hugging Face Hub "
        f"({spec.hub_path[0]}, config {spec.hub_path[1]!r}): {reason}. "
        f"Set task.data_dir to a local folder with train and validation files (.jsonl, .csv or .tsv; "
        f"here {files}, with columns {', '.join(spec.columns)}; GLUE's own train.tsv and dev.tsv load as downloaded), "
        f"e.g. --set task.data_dir=../shared/data/glue/{spec.name}. "
        f"If the dataset is already in your Hugging Face cache, start Python with HF_HUB_OFFLINE=1 to use it."
    )


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (a quick HEAD request, proxies honoured), or None if it can."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5.0)
    except Exception as exc:  # any transport failure means: do not start datasets' slow retries
        return f"cannot reach {constants.ENDPOINT} ({type(exc).__name__}: {exc})"
    return None


def _offline_reason() -> str | None:
    """Why the Hub will not be contacted (offline set, or unreachable), or None when it can be.
    ``datasets`` reads HF_HUB_OFFLINE once, at import: set later, it would still try the network
    (with retries), so the environment is read here too; offline in ``datasets`` itself means its
    cache is used, which is fine."""
    from datasets import config as datasets_config

    if datasets_config.HF_HUB_OFFLINE:
        return None
    if _env_offline():
        return "HF_HUB_OFFLINE is set, so the Hub is not contacted"
    return _hub_unreachable()


def load_hub_splits(spec: TaskSpec, limits: dict[str, int | None], seed: int,
                    renames: dict[str, str]) -> dict[str, list[Row]]:
    """The task's own Hub dataset (``spec.hub_path``), each split of ``limits`` checked."""
    if not spec.hub_path[0]:
        files = ", ".join(f"{s}.jsonl" for s in ("train", *spec.eval_splits))
        raise DataError(f"task {spec.name!r} has no Hugging Face Hub dataset: set task.data_dir to a folder with "
                        f"{files} (columns {', '.join(spec.columns)}; other names are mapped with task.columns), "
                        f"or task.dataset to a Hub id or a local path, "
                        f"e.g. --set task.data_dir=data/instruct (the instruction set shipped with dora_lab)")
    from datasets import load_dataset

    reason = _offline_reason()
    if reason is not None:
        raise DataError(_hub_help(spec, reason))
    try:
        dataset = load_dataset(spec.hub_path[0], spec.hub_path[1] or None)
    except (ConnectionError, OSError) as exc:
        raise DataError(_hub_help(spec, f"{type(exc).__name__}: {exc}")) from exc
    where = f"{spec.hub_path[0]} ({spec.hub_path[1]})"
    chosen = {split: _split(dataset, split, where, "") for split in limits}
    return _checked(spec, chosen, where, limits, seed, renames)


def _checked(spec: TaskSpec, chosen: Mapping[str, Any], where: str, limits: dict[str, int | None], seed: int,
             renames: dict[str, str]) -> dict[str, list[Row]]:
    """Rows of each task split from its ``datasets.Dataset`` in ``chosen``: every split's columns are
    checked first (a wrong name fails before any row is converted), then the rows."""
    for split, ds in chosen.items():
        check_columns(spec, [renames.get(c, c) for c in ds.column_names], f"{where} split {split!r}")
    out: dict[str, list[Row]] = {}
    for split, ds in chosen.items():
        keep = subset(len(ds), limits[split], seed)
        rows = renamed(ds.select(keep).to_list() if keep is not None else ds.to_list(), renames)
        out[split] = normalise(spec, rows, f"{where} split {split!r}", keep)
    return out


def _split(dataset: Any, name: str, where: str, key: str) -> Any:
    """Split ``name`` of the ``DatasetDict`` ``dataset``, or a slice of splits in ``datasets``' syntax
    (``train[:95%]``, ``train+validation``); a name that is not there is refused with those that are."""
    from datasets import ReadInstruction, concatenate_datasets

    present = ", ".join(dataset) or "(none)"
    if name in dataset:
        return dataset[name]
    try:
        parts = ReadInstruction.from_spec(name).to_absolute({k: len(v) for k, v in dataset.items()})
    except (AssertionError, ValueError, KeyError) as exc:
        setting = f" {key}" if key else ""
        raise DataError(f"{where} has no split {name!r}; the splits there are {present}. "
                        f"Set{setting} to one of them (or a slice such as train[:95%])"
                        + (f" ({exc})" if "[" in name else "")) from None
    return concatenate_datasets([dataset[p.splitname].select(range(p.from_, p.to)) for p in parts])


def load_dataset_splits(spec: TaskSpec, source: DatasetConfig, limits: dict[str, int | None], seed: int,
                        renames: dict[str, str]) -> dict[str, list[Row]]:
    """The rows ``task.dataset`` names (:mod:`dora_lab.run.config_data`): its ``train_split`` as
    ``train``, its ``eval_split`` as each of the task's evaluation splits, checked like any data."""
    try:
        names = source.split_names(spec.eval_splits)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    dataset, where = _open(source)
    keys = {"train": "task.dataset.train_split"}
    chosen = {split: _split(dataset, names[split], where, keys.get(split, "task.dataset.eval_split"))
              for split in limits}
    return _checked(spec, chosen, where, limits, seed, renames)


def _open(source: DatasetConfig) -> tuple[Any, str]:
    """The ``DatasetDict`` at ``source.path`` and how to name it in messages."""
    import datasets

    local = Path(source.path).expanduser()
    try:
        if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            return loaded, f"task.dataset {str(local)!r} (a save_to_disk folder)"
        if local.is_dir():
            return datasets.load_dataset(str(local)), f"task.dataset folder {str(local)!r}"
        if local.is_file():
            if local.suffix not in FILE_BUILDERS:
                raise DataError(f"task.dataset {str(local)!r} is a {local.suffix or 'suffix-less'} file; "
                                f"a data file must be one of {', '.join(FILE_BUILDERS)} (or give a folder)")
            builder, options = FILE_BUILDERS[local.suffix]
            return (datasets.load_dataset(builder, data_files={"train": str(local)}, **options),
                    f"task.dataset file {str(local)!r}")
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
        if isinstance(exc, DataError):
            raise
        cause = exc.__cause__ or exc.__context__ or exc  # datasets wraps the parser's own error
        raise DataError(f"task.dataset {str(local)!r} could not be read as a dataset "
                        f"({type(cause).__name__}: {cause}); fix the files or point task.dataset.path elsewhere") from exc
    return _open_hub(source), f"task.dataset {source.path!r}" + (f" (config {source.config!r})" if source.config else "")


def _open_hub(source: DatasetConfig) -> Any:
    from datasets import load_dataset

    def refuse(reason: str) -> DataError:
        return DataError(
            f"task.dataset {source.path!r} is not a local file or folder (resolved to "
            f"{Path(source.path).expanduser().resolve()}), and could not be loaded from the Hugging Face Hub: "
            f"{reason}. Set task.dataset to a local data file, a folder of .jsonl/.json/.csv/.parquet files or "
            f"a save_to_disk folder; if the dataset is already in your Hugging Face cache, start Python with "
            f"HF_HUB_OFFLINE=1 to use it")

    reason = _offline_reason()
    if reason is not None:
        raise refuse(reason)
    try:
        return load_dataset(source.path, source.config)
    except (ConnectionError, OSError, ValueError) as exc:
        raise refuse(f"{type(exc).__name__}: {exc}") from exc
