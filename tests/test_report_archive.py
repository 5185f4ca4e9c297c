"""``report.archives``: runs read back from a committed report's runs.csv compare exactly as the same
runs read live from their Optuna study and run folders.  Two real tiny studies (a tiny BERT on a slice
of CoLA, SQLite stores), a report that pools the reference study live (``report.include``), the
reference study's own report (the archive), then the study deleted from its store and the report
made again from the archive: the comparisons, flags and runs must not change."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from tiny import make_tiny_model_dir, one_thread, tiny_overrides

from dora_lab.report import compare as report
from dora_lab.report.archive import archived_runs
from dora_lab.report.io import read_report_block, source_from_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.studies import main as study_main

REPO = Path(__file__).resolve().parents[1]


def _study(folder: Path, name: str, overrides: dict[str, Any], report_block: dict[str, Any] | None = None,
           space: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {
        "base": str(REPO / "configs" / "cola.yaml"),
        "study": {"name": name, "sampler": {"name": "grid", "seed": 0}, "pruner": "none", "n_trials": None,
                  "timeout": None, "overrides": {"train.epochs": 2, **overrides},
                  "space": space or {"seed": {"type": "categorical", "choices": [0, 1, 2]}}}}
    if report_block:
        data["report"] = report_block
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


LORA = {"schedule.name": "constant", "adapter.r0": 2, "budget.target_rank": 2.0}
BLOCK = {"factors": ["schedule.name"], "reference": {"schedule.name": "constant"}}


def test_archived_runs_compare_as_the_live_ones(tmp_path: Path) -> None:
    with one_thread():
        sets = [*tiny_overrides(make_tiny_model_dir(tmp_path / "tiny", init_range=0.5), tmp_path / "out", train=64,
                                evals=64), "train.eval_every=2", "train.lr=0.03", "adapter.alpha=64",
                                "train.warmup_ratio=0"]
        args = [x for s in sets for x in ("--set", s)]
        # LoRA's rank searched as well (one choice): runs.csv's params column brings it back
        lora = _study(tmp_path, "arch_lora", LORA, space={"seed": {"type": "categorical", "choices": [0, 1, 2]},
                                                          "adapter.r0": {"type": "categorical", "choices": [2]}})
        live = _study(tmp_path, "arch_dora", {}, {**BLOCK, "include": ["arch_lora.yaml"]})
        archived = _study(tmp_path, "arch_dora_from_archive", {},
                          {**BLOCK, "archives": [{"study": "arch_lora.yaml", "report": "lora_report"}]})
        assert study_main([str(lora), *args]) == 0
        assert study_main([str(live), *args]) == 0
        assert report.main([str(live), *args, "--no-mlflow", "--out", str(tmp_path / "live_report")]) == 0
        assert report.main([str(lora), *args, "--no-mlflow", "--out", str(tmp_path / "lora_report")]) == 0
        # the same DoRA runs under a second study name, so the archive report has a live study of its own
        assert study_main([str(archived), *args]) == 0
        optuna.delete_study(study_name="arch_lora", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
        assert report.main([str(archived), *args, "--no-mlflow", "--out", str(tmp_path / "arch_report")]) == 0

    a, b = tmp_path / "live_report", tmp_path / "arch_report"
    live_cmp, arch_cmp = _csv(a / "comparisons.csv"), _csv(b / "comparisons.csv")
    assert len(live_cmp) == len(arch_cmp) == 1 and live_cmp[0]["n"] == "3"
    for key in ("mean_diff", "ci_low", "ci_high", "p_t", "p_holm", "p_sign_flip", "mdd"):
        assert arch_cmp[0][key] == live_cmp[0][key], key  # the same numbers to the last digit
    assert float(live_cmp[0]["mean_diff"]) != 0  # the tiny runs do differ

    def lora_rows(folder: Path, name: str) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "trial"} for r in _csv(folder / name) if r["group"] == "constant"]

    assert lora_rows(b, "flags.csv") == lora_rows(a, "flags.csv")  # the archived report's flags, carried over
    assert lora_rows(b, "runs.csv") == lora_rows(a, "runs.csv")  # value, last eval, size, environment
    groups = {g["group"]: g for g in _csv(b / "groups.csv")}
    assert float(groups["constant"]["active_components"]) == 2 * 12  # rank 2 in 12 matrices, from runs.csv
    md = (b / "report.md").read_text()
    assert "3 run(s) of `arch_lora` are read from the archive" in md
    assert "more than one environment" not in md  # runs.csv carries the whole environment of each run


def test_archives_refuse_what_they_cannot_read_back(tmp_path: Path) -> None:
    sets = ["output_dir=" + str(tmp_path / "out")]
    args = [x for s in sets for x in ("--set", s)]
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "runs.csv").write_text("study,trial,group,seed,value\nother,0,constant,0,0.5\ngrid_lora,0,constant,0,0.5\n")
    searched = _study(tmp_path, "grid_lora", LORA, space={"seed": {"type": "categorical", "choices": [0]},
                                                          "train.lr": {"type": "categorical", "choices": [1e-3]}})
    _study(tmp_path, "seeds_lora", LORA)
    with_plugin = _study(tmp_path, "plugin_lora", LORA)
    with_plugin.write_text(with_plugin.read_text() + "plugins: [my_scorer.py]\n")
    cases = {
        "missing_config": ({"study": "nope.yaml", "report": "rep"}, "no study config"),
        "missing_table": ({"study": "seeds_lora.yaml", "report": "nowhere"}, "no .*nowhere/runs.csv"),
        "other_study": ({"study": "seeds_lora.yaml", "report": "rep"}, "has no runs of study 'seeds_lora'.*it has: grid_lora, other"),
        "searched": ({"study": searched.name, "report": "rep"}, "searches train.lr besides the seed, and .* is from before runs.csv recorded"),
        "plugins": ({"study": with_plugin.name, "report": "rep"}, r"lists plugins \[.*my_scorer.py'\].*--trust-plugins"),
    }
    for name, (entry, message) in cases.items():
        path = _study(tmp_path, name, {}, {**BLOCK, "archives": [entry]})
        with pytest.raises(ConfigError, match=message):
            archived_runs(source_from_config(path, sets), sets)
        assert report.main([str(path), *args, "--no-mlflow"]) == 2  # one clear error, before any work
    bad = _study(tmp_path, "bad", {}, {"archives": [{"study": "x.yaml"}]})
    with pytest.raises(ConfigError, match=r"report.archives must be a list of \{study: STUDY.yaml, report: "
                                          r"REPORT_FOLDER\}.*archives.0.report: Field required"):
        read_report_block(bad)
