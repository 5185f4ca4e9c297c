"""examples/: the plugin files and configs run as a user runs them (real subprocesses, real SQLite
Optuna and MLflow stores), on the tiny BERT; and docs/extending.md shows exactly their code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from tiny import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("examples") / "tiny")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models; the machine is shared
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **threads})


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def snippets(page: str) -> dict[str, str]:
    """The ```python blocks of docs/extending.md by the section they stand in."""
    found = {}
    for section in page.split("\n## ")[1:]:
        title, _, body = section.partition("\n")
        if "```python\n" in body:
            found[title] = body.split("```python\n", 1)[1].split("```", 1)[0]
    return found


def test_the_manual_shows_the_examples_code() -> None:
    """One home: the snippets in docs/extending.md are the examples' code line for line (blank lines
    aside: the files are formatted by ruff, the page is kept short)."""
    page = snippets((REPO / "docs" / "extending.md").read_text())
    for title, example in (("Add your own importance scorer", "add_scorer.py"),
                           ("Add your own allocation method", "add_method.py"),
                           ("Add your own task", "add_task.py")):
        code = (EXAMPLES / example).read_text().split('"""\n\n', 1)[1]  # after the module docstring
        assert code_lines(page[title]) == code_lines(code), example


def test_tiny_run_trains_with_your_task_and_scorer(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run("dora_lab.train", "examples/tiny_run.yaml", "--set", f"model.name={tiny_model}",
                 "--set", f"output_dir={tmp_path}", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"f1", "accuracy"} <= set(metrics["final"])  # the example task's metrics
    assert metrics["active_components_final"] == 12  # target rank 1 on the tiny BERT's 12 matrices
    scores = json.loads((run_dir / "scores.json").read_text())
    assert (scores["method"], scores["scorer"]) == ("dora", "weight_norm")
    # the kept components are the global top 12 of the example scorer's final scores
    ranked = sorted(((s, n, i) for n, layer in scores["scores"].items() for i, s in enumerate(layer)), reverse=True)
    top = {(n, i) for _, n, i in ranked[:12]}
    assert {(n, i) for n, kept in scores["kept_components"].items() for i in kept} == top


def test_tiny_study_runs_your_method_against_dora(tiny_model: Path, tmp_path: Path) -> None:
    result = run("dora_lab.study", "examples/tiny_study.yaml", "--set", f"model.name={tiny_model}",
                 "--set", f"output_dir={tmp_path}", "--set", "study.space.seed={type: categorical, choices: [0]}")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="examples_methods", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = {t.params["method.name"]: t for t in study.trials}
    assert set(trials) == {"dora", "grow_where_grad"}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values())
    for name, trial in trials.items():  # each trial ran the method it names
        scores = json.loads((Path(trial.user_attrs["run_dir"]) / "scores.json").read_text())
        assert scores["method"] == name
    assert (tmp_path / "report" / "examples_methods" / "report.md").is_file()
