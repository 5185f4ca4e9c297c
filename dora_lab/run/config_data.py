"""``task.dataset``: a task's rows from a Hugging Face Hub dataset or a local path, no plugin needed.

``task.dataset: <hub id or path>`` (a string) or a mapping ``{path, config, train_split, eval_split}``:

- ``path``: a Hub dataset id (``tatsu-lab/alpaca``, through ``datasets.load_dataset``), or a local
  file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``: one split, ``train``), a folder of
  such files (split names from the file names, as ``datasets`` infers them: ``train.jsonl``,
  ``validation.jsonl``, ``test.parquet``...) or a folder written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk``;
- ``config``: the Hub dataset's configuration (``load_dataset``'s second argument), if it has several;
- ``train_split`` / ``eval_split``: the dataset's split names for training and for the task's
  evaluation split(s) (a list for a task with several, e.g. mnli); ``datasets``' slice syntax
  works (``train[:95%]`` and ``train[95%:]`` for a set that ships one split).

The data's column names are mapped to the task's with ``task.columns`` (``{instruction: prompt,
output: response}``), the same key as for ``task.data_dir``.  A split or column that does not
exist is refused when the data is loaded, before any training, with the names that do exist.
See :mod:`dora_lab.run.hub_data`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DatasetConfig"]


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str = Field(..., min_length=1, description="a Hub dataset id, a data file, a folder of data files, "
                                                     "or a save_to_disk folder")
    config: str | None = Field(None, description="the Hub dataset's configuration name (null: its default)")
    train_split: str = Field("train", min_length=1, description="the split trained on (slices work: train[:95%])")
    eval_split: str | list[str] | None = Field(
        None, description="the split(s) evaluated, one per task evaluation split (null: the task's own names)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        """``task.dataset: tatsu-lab/alpaca`` is ``{path: tatsu-lab/alpaca}``."""
        return {"path": value} if isinstance(value, str) else value

    def split_names(self, eval_splits: tuple[str, ...]) -> dict[str, str]:
        """The dataset split (or slice) read for each of the task's splits (``train`` and ``eval_splits``)."""
        chosen = self.eval_split
        names = list(eval_splits) if chosen is None else [chosen] if isinstance(chosen, str) else list(chosen)
        if len(names) != len(eval_splits):
            raise ValueError(f"task.dataset.eval_split names {len(names)} split(s) ({', '.join(names)}) but the "
                             f"task evaluates {len(eval_splits)} ({', '.join(eval_splits)}): give one per "
                             f"evaluation split, in that order")
        return {"train": self.train_split, **dict(zip(eval_splits, names, strict=True))}
