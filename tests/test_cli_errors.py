"""Clear errors instead of tracebacks (issue 12): bad input is refused before any work with exit 2
and nothing stored; a run that fails while training exits 1 and says what its folder keeps.

The CLIs are run for real: as subprocesses where the exit status and the absence of a traceback
are the point, else through their ``main`` (the same code, without a second interpreter's start-up).
As root, file permissions do not stop a write, so "unwritable" is tested with a file where a folder
should be and with a path under ``/proc`` (where nothing can be created, root or not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dora_lab.core.scorers import SCORERS
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.run.data import load_splits
from dora_lab.run.rows import DataError
from dora_lab.run.tasks import get_task
from dora_lab.run.train import main as train_main
from tests.tiny import COLA, REPO, make_tiny_model_dir

pytestmark = pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
COLA_YAML = str(REPO / "configs" / "cola.yaml")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "bert")


def _sets(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    """``--set`` arguments for a run of 4 optimizer steps on 32 CoLA sentences."""
    sets = [f"model.name={tiny_dir}", f"task.data_dir={COLA}", "task.max_train_samples=32",
            "task.max_eval_samples=16", f"output_dir={out}", "train.batch_size=8", "train.max_steps=4",
            "train.eval_every=2", "schedule.warmup=1", "schedule.final=1", "schedule.interval=1",
            "train.save_adapter=false", *extra]
    return [x for s in sets for x in ("--set", s)]


def _run(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


# -- python -m dora_lab.train: exit 2 before work, exit 1 during training -----------------------
def test_train_cli_refuses_a_missing_data_folder_with_exit_2(tiny_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_data"
    proc = _run("dora_lab.train", COLA_YAML, *_sets(tiny_dir, tmp_path / "out", f"task.data_dir={missing}"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"task.data_dir {str(missing)!r} does not exist" in proc.stderr
    assert "Nothing was started or stored." in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_cli_says_what_a_diverged_run_keeps_with_exit_1(tiny_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run("dora_lab.train", COLA_YAML, *_sets(tiny_dir, tmp_path / "out", "train.divergence_loss=0.01"),
                "--run-dir", str(run_dir))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "DivergenceError: training diverged at step 0" in proc.stderr and "lower train.lr" in proc.stderr
    assert f"The run folder {run_dir} keeps config.yaml (the run did not finish" in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def _bad_row_data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    lines = (COLA / "train.jsonl").read_text().splitlines()[:40]
    lines[29] = json.dumps({"sentence": "A row with a label CoLA does not have.", "label": 7, "idx": 29})
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "validation.jsonl").symlink_to(COLA / "validation.jsonl")
    return folder


@pytest.mark.parametrize("fault", ["bad_row", "output_dir_is_a_file", "output_dir_under_proc",
                                   "schedule_longer_than_max_steps", "schedule_longer_than_the_epochs"])
def test_train_cli_refuses_bad_input_before_work(tiny_dir: Path, tmp_path: Path, fault: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    extra, expected = {
        "bad_row": ([f"task.data_dir={tmp_path / 'data'}"],
                    f"{tmp_path / 'data' / 'train.jsonl'} row 30 has label 7"),
        "output_dir_is_a_file": ([f"output_dir={tmp_path / 'a_file'}"],
                                 f"lies under {str(tmp_path / 'a_file')!r}, which is a file, not a folder"),
        "output_dir_under_proc": (["output_dir=/proc/dora_lab_test"], "output_dir: cannot write to '/proc/dora_lab_test"),
        "schedule_longer_than_max_steps": (["schedule.warmup=3", "schedule.final=2"],
                                           "schedule.warmup (3) and schedule.final (2) do not fit train.max_steps (4)"),
        # 32 sentences, batch 8, one epoch: 4 steps, known only once the data is loaded
        "schedule_longer_than_the_epochs": (["train.max_steps=null", "train.epochs=1", "schedule.warmup=3"],
                                            "do not fit this run (4 optimizer steps"),
    }[fault]
    (tmp_path / "a_file").write_text("not a folder\n")
    if fault == "bad_row":
        _bad_row_data(tmp_path)
    assert train_main([COLA_YAML, *_sets(tiny_dir, out, *extra)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.rstrip().endswith("Nothing was started or stored."), err
    assert not out.exists() and not Path("/proc/dora_lab_test").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a_file", *(["data"] if fault == "bad_row" else [])])


@pytest.fixture
def bad_scorers(tmp_path: Path) -> Iterator[Path]:
    plugin = tmp_path / "bad_scorers.py"
    plugin.write_text(
        "import torch\nfrom dora_lab import register_scorer\n\n"
        "@register_scorer('cli_nan')\ndef nan(layer):\n    return torch.full((layer.rank,), float('nan'))\n\n"
        "@register_scorer('cli_negative')\ndef negative(layer):\n    return -torch.ones(layer.rank)\n\n"
        "@register_scorer('cli_wrong_shape')\ndef wrong_shape(layer):\n    return torch.ones(layer.rank + 1)\n")
    yield plugin
    for name in ("cli_nan", "cli_negative", "cli_wrong_shape"):
        SCORERS.remove(name)


@pytest.mark.parametrize(("scorer", "expected"), [
    ("cli_nan", "ValueError: scorer 'cli_nan' returned negative or non-finite scores"),
    ("cli_negative", "ValueError: scorer 'cli_negative' returned negative or non-finite scores"),
    ("cli_wrong_shape", "ValueError: scorer 'cli_wrong_shape' returned shape (4,) for layer"),
])
def test_train_cli_reports_a_bad_scorer_with_exit_1(tiny_dir: Path, tmp_path: Path, bad_scorers: Path, scorer: str,
                                                    expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    sets = _sets(tiny_dir, tmp_path / "out", f"plugins=[{bad_scorers}]", f"scorer.name={scorer}", "scorer.params={}",
                 "schedule.warmup=0")
    assert train_main([COLA_YAML, *sets, "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert f"error: the run failed during training: {expected}" in err
    assert f"The run folder {run_dir} keeps config.yaml (the run did not finish" in err


# -- plugins ------------------------------------------------------------------------------------
def _config(folder: Path, plugins: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'cola.yaml'}\nplugins: [{plugins}]\n")
    return path


@pytest.mark.parametrize(("source", "expected"), [
    ("x = 1\n\ndef broken(:\n    pass\n", "line 3: SyntaxError: invalid syntax"),
    ("import os\n\n\nraise RuntimeError('no licence server')\n", "line 4: RuntimeError: no licence server"),
])
def test_a_plugin_that_fails_on_import_is_named_with_its_line_and_key(tmp_path: Path, source: str,
                                                                       expected: str) -> None:
    (tmp_path / "cfg" / "plugins").mkdir(parents=True)
    plugin = tmp_path / "cfg" / "plugins" / "broken.py"
    plugin.write_text(source)
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path / "cfg", str(plugin)))  # absolute: relative paths are the next test's
    message = str(info.value)
    assert f"plugin file {str(plugin)!r} (config key 'plugins') failed on import at {plugin}, {expected}" in message


def test_a_relative_plugin_path_is_relative_to_the_yaml_that_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Like ``base:``; a same-named file in the current folder is not run."""
    config = _config(tmp_path / "cfg", "probe_plugin.py")
    (tmp_path / "cfg" / "probe_plugin.py").write_text(
        "from dora_lab import register_scorer\n\n@register_scorer('yaml_relative_probe')\n"
        "def probe(layer):\n    return layer.c.abs()\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "probe_plugin.py").write_text("raise SystemExit('the wrong file ran')\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    try:
        cfg = load_config(config, ["scorer.name=yaml_relative_probe", "scorer.params={}"])
        assert cfg.plugins == [str(tmp_path / "cfg" / "probe_plugin.py")]
        assert cfg.scorer.name == "yaml_relative_probe"
    finally:
        SCORERS.remove("yaml_relative_probe")


# -- data files -----------------------------------------------------------------------------------
def test_an_empty_data_file_is_called_empty(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "validation.jsonl").symlink_to(COLA / "validation.jsonl")
    with pytest.raises(DataError, match=f"^{tmp_path / 'train.jsonl'} is empty \\(no rows\\)"):
        load_splits(get_task("cola"), tmp_path)


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_a_non_utf8_byte_names_the_file_and_line(tmp_path: Path, suffix: str) -> None:
    good = [json.loads(line) for line in (COLA / "train.jsonl").read_text().splitlines()[:300]]
    if suffix == ".tsv":  # long enough that the bad byte is past the first read buffer
        text = "sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in good)
    else:
        text = "".join(json.dumps(r) + "\n" for r in good)
    lines = text.encode().splitlines(keepends=True)
    lines[200] = lines[200].replace(b"e", b"\xe9", 1)  # Latin-1 e-acute
    (tmp_path / f"train{suffix}").write_bytes(b"".join(lines))
    (tmp_path / "validation.jsonl").symlink_to(COLA / "validation.jsonl")
    with pytest.raises(DataError, match=f"^{tmp_path / f'train{suffix}'} line 201 is not UTF-8 text \\(byte 0xe9"):
        load_splits(get_task("cola"), tmp_path)


# -- python -m dora_lab.study and python -m dora_lab.export -------------------------------------------
def test_study_cli_refuses_an_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dora_lab.studies import main as study_main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    assert study_main([COLA_YAML, "--set", f"output_dir={blocker}", "--set", f"task.data_dir={COLA}"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir: {str(blocker)!r} is a file, not a folder" in err
    assert "Nothing was started or stored." in err and err.count("error:") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_export_cli_refuses_a_tracking_uri_with_no_database(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.db"
    proc = _run("dora_lab.export", "0123456789abcdef0123456789abcdef", "--to", "peft", str(tmp_path / "out"),
                "--tracking-uri", f"sqlite:///{wrong}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"--tracking-uri sqlite:///{wrong}: no MLflow database at {wrong}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not wrong.exists() and list(tmp_path.iterdir()) == []
