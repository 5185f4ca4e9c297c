"""Hostile names and files refused at config time (issue 28, items 1-3, 6, 7): names that would
become paths outside ``output_dir``, YAML that expands without bound, nests too deep or is not UTF-8,
plugins that only someone else's config lists, an export onto its own source, numbers that are not
finite or a fractional step count, an empty config, a run folder that cannot be a folder, a deleted
metrics.json.  Exit codes are checked on real subprocesses; the one study that runs (named
``o'brien``) does so in-process on the tiny BERT, and the test walks every file it wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from tiny import COLA, make_tiny_model_dir, tiny_overrides

from dora_lab import inject_adapters
from dora_lab.core.checkpoint import CONFIG_NAME, save_adapter
from dora_lab.plan.setup import prepare
from dora_lab.run.config import load_config
from dora_lab.run.config_yaml import MAX_BYTES, MAX_NODES, ConfigError, parse_assignment, read_yaml
from dora_lab.track.links import filter_value

REPO = Path(__file__).resolve().parents[1]
COLA_YAML = str(REPO / "configs" / "cola.yaml")


def _run(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _sets(*pairs: str) -> list[str]:
    return [x for s in pairs for x in ("--set", s)]


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error:"), proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr, proc.stderr[-2000:]


# -- 1. names that become folders and filter values --------------------------------------------
@pytest.mark.parametrize("key,value,says", [
    ("study.name", "../../escaped", "cannot be a name"),
    ("study.name", "/tmp/anywhere", "cannot be a name"),
    ("study.name", "x" * 300, "300 characters"),
    ("study.name", ".hidden", "cannot be a name"),
    ("study.name", 'say "hi"', "cannot be a name"),
    ("study.experiment", "../exp", "cannot be a name"),
])
def test_a_name_that_would_leave_output_dir_is_refused_at_config_time(tmp_path: Path, key: str, value: str,
                                                                     says: str) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        prepare(COLA_YAML, [f"output_dir={tmp_path / 'out'}", f"{key}={value}"])
    assert key in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_default_name_from_the_file_name_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "my study!.yaml"
    config.write_text(f"base: {COLA_YAML}\n")
    with pytest.raises(ConfigError, match=r"study.name \(default: the config file's name\).*e.g. to 'my study'"):
        prepare(config, [f"output_dir={tmp_path / 'out'}"])


def test_the_study_cli_refuses_an_escaping_name_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    proc = _run("dora_lab.study", COLA_YAML, *_sets(f"output_dir={root / 'out'}", "study.name=../../escaped"),
                cwd=root)
    _refused(proc, "study.name: '../../escaped' cannot be a name", "e.g. to 'escaped'")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_report_refuses_an_unsafe_study_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dora_lab.report.compare import main as report_main

    assert report_main(["../../x", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]) == 2
    assert "STUDY: '../../x' cannot be a name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_mlflow_filter_values_are_quoted() -> None:
    from mlflow.utils.search_utils import SearchUtils

    for text in ("plain", "o'brien", "it's 'quoted'"):
        parsed = SearchUtils.parse_search_filter(f"tags.`t` = {filter_value(text)}")
        assert parsed[0]["value"] == text
    with pytest.raises(ValueError, match="both quote"):
        filter_value("""a'b"c""")


@pytest.mark.skipif(not COLA.is_dir(), reason=f"shared CoLA data not found at {COLA}")
def test_a_study_named_o_brien_runs_reports_and_writes_only_inside_output_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The legal name with a quote works end to end (before: MLflow's filter parser failed after both
    stores were made); every file the study and its report write is under output_dir (the working
    folder is a fresh one, so a stray relative write would show); a COMPLETE trial whose
    metrics.json is gone is named by the report (before: silent n/a cells)."""
    from dora_lab.report.compare import main as report_main
    from dora_lab.studies import main as study_main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = make_tiny_model_dir(tmp_path / "tiny")
    work, out = tmp_path / "work", tmp_path / "work" / "out"
    work.mkdir()
    monkeypatch.chdir(work)
    sets = [s for s in tiny_overrides(model, out, train=32, evals=32) if not s.startswith("schedule.interval=")]
    before = {p for p in tmp_path.rglob("*")}
    assert study_main([COLA_YAML, *_sets(*sets, "study.name=o'brien", "study.n_trials=1",
                                         "train.epochs=1", "train.eval_every=2")]) == 0
    written = sorted(p for p in tmp_path.rglob("*") if p not in before and p.is_file())
    assert written, "the study wrote nothing"
    outside = [p for p in written if not p.is_relative_to(out)]
    assert outside == []
    assert (out / "studies" / "o'brien").is_dir()
    metrics = next((out / "studies" / "o'brien").rglob("metrics.json"))
    metrics.unlink()
    capsys.readouterr()
    report_main(["o'brien", "--storage", f"sqlite:///{out / 'optuna.db'}", "--tracking-uri",
                 f"sqlite:///{out / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert f"trial 0's {metrics} is missing" in err
    assert "no parent run" not in err  # found through the quoted filter
    later = [p for p in tmp_path.rglob("*") if p not in before and p.is_file()]
    assert [p for p in later if not p.is_relative_to(out)] == []


# -- 2. the YAML loader's bounds, and plugins in report ---------------------------------------
def _bomb(path: Path, block: str = "report") -> Path:
    lines = [f"{block}:", '  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path.write_text(f"base: {COLA_YAML}\n" + "\n".join(lines) + "\n")
    return path


def test_an_alias_bomb_is_refused_in_milliseconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES:,} values once its aliases"):
        read_yaml(_bomb(tmp_path / "bomb.yaml"))
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ConfigError, match="values once its aliases"):
        parse_assignment("report.x=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                         "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                         "[*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]")


def test_a_file_over_the_size_bound_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(f"base: {COLA_YAML}\n" + "# padding\n" * (MAX_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"more than a config may be \\({MAX_BYTES:,}\\)"):
        read_yaml(big)


def test_aliases_and_merge_keys_of_ordinary_size_still_work(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text(f"base: {COLA_YAML}\nx: &s {{lr: 1.0e-3}}\ntrain:\n  <<: *s\n  epochs: 1\n")
    data = read_yaml(config)
    assert data["train"]["lr"] == 1.0e-3 and data["train"]["epochs"] == 1


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "loop.yaml"
    config.write_text("report: &r {x: *r}\n")
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        read_yaml(config)


def test_deep_yaml_not_utf8_and_empty_files_exit_2(tmp_path: Path) -> None:
    deep, latin, empty = tmp_path / "deep.yaml", tmp_path / "latin.yaml", tmp_path / "empty.yaml"
    deep.write_text("seed: " + "[" * 3000 + "]" * 3000 + "\n")
    latin.write_bytes("seed: 0\n# caf\xe9\n".encode("latin-1"))
    empty.write_text("# nothing yet\n")
    procs = {
        "deep": _run("dora_lab.study", str(deep), cwd=tmp_path),
        "latin": _run("dora_lab.train", str(latin), cwd=tmp_path),
        "empty": _run("dora_lab.study", str(empty), cwd=tmp_path),
    }
    _refused(procs["deep"], str(deep), "nested more than 100 deep")
    _refused(procs["latin"], str(latin), "is not UTF-8 text: byte 13 (0xe9, line 2)")
    _refused(procs["empty"], str(empty), "is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.yaml", "empty.yaml", "latin.yaml"]


def _plugin(path: Path, marker: Path) -> Path:
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return path


def test_report_runs_no_plugin_that_only_a_base_or_an_included_config_lists(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    _plugin(tmp_path / "theirs.py", marker)
    (tmp_path / "colleague.yaml").write_text(f"base: {COLA_YAML}\nplugins: [theirs.py]\n")
    (tmp_path / "mine.yaml").write_text(f"base: colleague.yaml\noutput_dir: {tmp_path / 'out'}\n")
    (tmp_path / "pooled.yaml").write_text(f"base: {COLA_YAML}\noutput_dir: {tmp_path / 'out'}\n"
                                          "report: {include: [colleague.yaml]}\n")
    through_base = _run("dora_lab.report", str(tmp_path / "mine.yaml"), cwd=tmp_path)
    through_include = _run("dora_lab.report", str(tmp_path / "pooled.yaml"), cwd=tmp_path)
    _refused(through_base, "colleague.yaml, pulled in through base: of", "--trust-plugins", "theirs.py")
    _refused(through_include, "colleague.yaml, pulled in through report.include of", "--trust-plugins")
    assert not marker.exists()
    trusted = _run("dora_lab.report", str(tmp_path / "mine.yaml"), "--trust-plugins", cwd=tmp_path)
    assert marker.read_text() == "ran"
    assert f"report: runs plugins listed in {tmp_path / 'colleague.yaml'}: {tmp_path / 'theirs.py'}" \
        in trusted.stderr
    assert "Traceback" not in trusted.stderr  # it goes on to say there is no study yet


def test_report_runs_the_named_configs_own_plugins_and_says_so(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    _plugin(tmp_path / "mine.py", marker)
    (tmp_path / "mine.yaml").write_text(f"base: {COLA_YAML}\nplugins: [mine.py]\noutput_dir: {tmp_path / 'out'}\n")
    proc = _run("dora_lab.report", str(tmp_path / "mine.yaml"), cwd=tmp_path)
    assert marker.read_text() == "ran"
    assert f"report: runs plugins listed in {tmp_path / 'mine.yaml'}: {tmp_path / 'mine.py'}" in proc.stderr
    assert "no Optuna storage" in proc.stderr and proc.returncode == 2


# -- 3. export onto its own source ---------------------------------------------------------------
def test_export_refuses_its_own_source_as_destination_and_keeps_it(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    tiny_bert(0, dtype=torch.float32).save_pretrained(base_dir)
    model = tiny_bert(0, dtype=torch.float32)
    inject_adapters(model, r0=2)
    adapter = tmp_path / "run" / "adapter"
    save_adapter(model, adapter, base_model=str(base_dir), num_labels=2)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    same = _run("dora_lab.export", str(adapter), "--to", "peft", str(adapter), "--force")
    inside = _run("dora_lab.export", str(tmp_path / "run"), "--to", "merged", str(adapter / "merged"))
    run_itself = _run("dora_lab.export", str(tmp_path / "run"), "--to", "peft", str(tmp_path / "run"), "--force")
    _refused(same, "is the source", "give an OUT outside it")
    _refused(inside, "lies inside the source")
    _refused(run_itself, "is the source")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert (adapter / CONFIG_NAME).is_file()


# -- 6, 7. numbers, run folders ------------------------------------------------------------------
@pytest.mark.parametrize("setting,says", [
    ("train.epochs=.inf", "train.epochs: Input should be a finite number"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("regularizer.weight=.inf", "regularizer.weight: Input should be a finite number"),
    ("schedule.warmup=1.5", "schedule.warmup: 1.5 is neither a fraction"),
    ("schedule.final=10.25", "schedule.final: 10.25 is neither a fraction"),
])
def test_numbers_must_be_finite_and_step_counts_whole(setting: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load_config(COLA_YAML, [setting])


def test_whole_step_counts_and_fractions_still_work() -> None:
    cfg = load_config(COLA_YAML, ["schedule.warmup=2.0", "schedule.final=0.25"])
    assert (cfg.schedule.warmup, cfg.schedule.final) == (2, 0.25)


def test_study_space_bounds_must_be_finite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finite"):
        prepare(COLA_YAML, [f"output_dir={tmp_path}", "study.space.train.lr={type: float, low: 1.0e-4, high: .inf}"])


def test_a_float_search_that_would_sample_fractional_step_counts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"study.space.schedule.warmup: 1.25 does not fit .*neither a fraction"):
        prepare(COLA_YAML, [f"output_dir={tmp_path}", "study.space.schedule.warmup={type: float, low: 0.5, high: 3}"])
    setup = prepare(COLA_YAML, [f"output_dir={tmp_path}",  # whole steps as a float grid are fine
                                "study.space.schedule.warmup={type: float, low: 1, high: 4, step: 1}"])
    assert setup.study.space["schedule.warmup"].high == 4


def test_train_refuses_inf_epochs_and_bad_run_dirs_with_exit_2_before_loading(tmp_path: Path) -> None:
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone" / "run")
    common = _sets(f"output_dir={tmp_path / 'out'}", "model.name=/no/such/model", "task.data_dir=/no/such/data")
    procs = {
        "inf": _run("dora_lab.train", COLA_YAML, *common, "--set", "train.epochs=.inf", cwd=tmp_path),
        "long": _run("dora_lab.train", COLA_YAML, *common, "--run-dir", str(tmp_path / ("r" * 300)), cwd=tmp_path),
        "dangling": _run("dora_lab.train", COLA_YAML, *common, "--run-dir", str(dangling), cwd=tmp_path),
    }
    # model and data paths that do not exist: a refusal that names them would mean they were reached
    _refused(procs["inf"], "train.epochs: Input should be a finite number")
    _refused(procs["long"], "--run-dir: the name 'rrrr", "300 bytes, longer than the file system allows (255)")
    _refused(procs["dangling"], f"--run-dir: {str(dangling)!r} is a symbolic link to", "which does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]
