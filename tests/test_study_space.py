"""The study block: validation with dotted paths, the search space against RunConfig, the order in
which a trial's config is composed, and the shipped study files (no training here)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dora_lab.plan.setup import parse_study, prepare, read_study_block, trial_config
from dora_lab.run.config_yaml import ConfigError
from dora_lab.study.samplers import suggest

REPO = Path(__file__).resolve().parents[1]
COLA = REPO / "configs" / "cola.yaml"


def error(overrides: list[str], path: Path = COLA) -> str:
    with pytest.raises(ConfigError) as info:
        prepare(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(("override", "expected"), [
    ("study.sampler.nam=tpe", "study.sampler.nam: unknown key"),
    ("study.sampler={name: random, n_startup_trials: 3}", "study.sampler.n_startup_trials: unknown key"),
    ("study.pruner=foo", "study.pruner: Input tag 'foo'"),
    ("study.space.train.lr={type: float, low: 1.0e-4, high: 1.0e-3, bogus: 1}", "study.space.train.lr.bogus: unknown key"),
    ("study.space.train.lr={low: 1.0e-4, high: 1.0e-3}", "study.space.train.lr: a searched key needs type"),
    ("study.space.train.lr={type: float, low: 1.0e-3, high: 1.0e-4}", "low (0.001) is above high (0.0001)"),
    ("study.space.train.lr={type: float, low: 0, high: 1}", "study.space.train.lr: 0.0 does not fit config key 'train.lr'"),
    ("study.space.train.lrx={type: float, low: 1, high: 2}", "'lrx' is not a key of train (allowed: method, epochs"),
    ("study.space.study.n_trials={type: int, low: 1, high: 2}", "'study' is not a key of the top level"),
    ("study.space.adapter.r0={type: float, low: 3, high: 5}", "'adapter.r0' takes integers; use type: int"),
    ("study.space.schedule.name={type: categorical, choices: [dora, nope]}", "unknown schedule(s) ['nope']; registered: adalora"),
    ("study.space.scorer.name={type: categorical, choices: [magnitud]}", "unknown scorer(s) ['magnitud']"),
    ("study.space.adapter.targets={type: categorical, choices: [[query]]}", "choices must be numbers, strings"),
    ("study.sampler=grid", "sampler grid takes categorical parameters only"),
    ("study.overrides={train.epoch: 1}", "no config key 'train.epoch'"),
    ("study.overrides.schedule.final=0.95", "study's base config (study.overrides applied) is invalid"),
    ("study.n_trials=0", "study.n_trials: Input should be greater than or equal to 1"),
])
def test_bad_study_blocks_name_the_key(override: str, expected: str) -> None:
    assert expected in error([override])


def test_defaults_and_the_shipped_study() -> None:
    setup = prepare(COLA, ["output_dir=/tmp/somewhere"])
    assert setup.name == "cola" and setup.metric == "matthews_correlation"
    assert setup.storage == "sqlite:////tmp/somewhere/optuna.db"
    assert setup.study.direction == "maximize" and setup.study.sampler.name == "tpe"
    assert setup.base.budget.target_rank == 2  # the budget is held fixed
    assert set(setup.study.space) == {"adapter.r0", "schedule.name", "schedule.warmup", "schedule.final",
                                      "schedule.interval", "scorer.params.beta", "train.lr"}
    assert setup.study.space["train.lr"].log  # type: ignore[union-attr]


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert prepare(COLA, ["output_dir=/tmp/x"]).tracking_uri == "sqlite:////tmp/x/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert prepare(COLA, ["output_dir=/tmp/x"]).tracking_uri == "http://127.0.0.1:5999"
    assert prepare(COLA, ["study.tracking_uri=sqlite:////tmp/y.db"]).tracking_uri == "sqlite:////tmp/y.db"


def test_nested_and_dotted_keys_mean_the_same() -> None:
    setup = prepare(COLA, ["study.space.train.lr={type: float, low: 1.0e-4, high: 2.0e-4}",
                           "study.overrides.train.epochs=1", "study.overrides.scorer.params={}"])
    assert setup.study.space["train.lr"].high == 2.0e-4  # type: ignore[union-attr]
    assert setup.study.overrides["train.epochs"] == 1
    assert setup.study.overrides["scorer.params"] == {}  # a free mapping is replaced, not descended


def test_trial_config_order_file_overrides_cli_params() -> None:
    setup = prepare(COLA, ["train.epochs=3", "adapter.alpha=16"])
    assert setup.base.train.epochs == 3  # the command line wins over study.overrides (2)
    assert prepare(COLA).base.train.epochs == 2  # study.overrides (2) over the file (3)
    cfg = trial_config(setup.data, setup.study, {"adapter.r0": 5, "scorer.params.beta": 0.8}, setup.cli)
    assert cfg.adapter.r0 == 5 and cfg.scorer.params == {"beta": 0.8} and cfg.study is None
    assert cfg.adapter.alpha == 16 and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="leaves no steps for pruning"):
        trial_config(setup.data, setup.study, {"schedule.warmup": 0.6, "schedule.final": 0.5}, setup.cli)


def test_suggest_covers_every_type() -> None:
    study = parse_study({"space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                   "adapter.r0": {"type": "int", "low": 3, "high": 6, "step": 3},
                                   "seed": {"type": "categorical", "choices": [0, 1]}}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = suggest(trial, study.space)
    assert 1e-4 <= values["train.lr"] <= 1e-2 and values["adapter.r0"] in (3, 6) and values["seed"] in (0, 1)
    assert trial.distributions["train.lr"].log  # type: ignore[attr-defined]


def test_ablation_files_replace_space_sampler_pruner(tmp_path: Path) -> None:
    grid = prepare(REPO / "studies" / "scorer_schedule_grid.yaml")
    assert grid.name == "scorer_x_schedule" and grid.study.sampler.name == "grid"
    assert grid.study.pruner.name == "none" and list(grid.study.space) == ["scorer.name", "schedule.name", "seed"]
    assert grid.study.overrides["train.epochs"] == 2 and grid.study.overrides["scorer.params"] == {}  # merged
    sweep = prepare(REPO / "studies" / "budget_sweep.yaml")
    assert sweep.study.grid()["budget.target_rank"] == [1.0, 1.5, 2.0, 3.0]
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {COLA}\nstudy:\n  n_trials: 2\n")
    block = read_study_block(child)
    assert block is not None and block["n_trials"] == 2 and "train.lr" in block["space"]  # inherited


def test_grid_points_are_claimed_once_and_interrupted_ones_again(tmp_path: Path) -> None:
    """A grid trial is created only together with its point (under the storage's lock): nothing is
    queued ahead, a point held by a running trial is not handed out twice, and a point whose trial
    was interrupted is free again."""
    from dora_lab.study.grid import claim_grid_point, trials_to_run
    from dora_lab.study.runner import open_study

    setup = prepare(COLA, [f"output_dir={tmp_path}", "study.sampler=grid", "study.n_trials=null",
                           "study.space={seed: {type: categorical, choices: [0, 1, 2]}}"])
    study = open_study(setup)
    assert trials_to_run(setup.study, study) == 3 and study.get_trials() == []  # counted, not queued

    def claim() -> optuna.Trial:
        trial = claim_grid_point(setup.study, study, setup.storage)
        assert trial is not None
        return trial

    for reason in ("DivergenceError: training diverged", "interrupted (KeyboardInterrupt / Ctrl-C)"):
        trial = claim()
        suggest(trial, setup.study.space)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    diverged, interrupted = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert (diverged.params["seed"], interrupted.params["seed"]) == (0, 1)  # the grid's order
    assert trials_to_run(setup.study, study) == 2  # the interrupted point and the one never started
    # a queue entry of a held point, left by an older version: recorded as not run, never run
    study.enqueue_trial({"seed": 0})
    retry, last = claim(), claim()
    assert (suggest(retry, setup.study.space), suggest(last, setup.study.space)) == ({"seed": 1}, {"seed": 2})
    assert study.trials[retry.number].user_attrs["retry_of"] == interrupted.number
    stray = study.trials[2]
    assert stray.state == optuna.trial.TrialState.FAIL and "not run" in stray.user_attrs["fail_reason"]
    assert claim_grid_point(setup.study, study, setup.storage) is None  # 1 and 2 are running: nothing is left to hand out
    for trial in (retry, last):
        study.tell(trial, 0.0)
    assert trials_to_run(setup.study, study) == 0 and claim_grid_point(setup.study, study, setup.storage) is None
    assert len(study.trials) == 5


def test_a_point_is_held_while_its_trial_suggests_its_params(tmp_path: Path) -> None:
    """A running trial that has suggested only part of its point still holds the whole point: between
    a worker's first and second ``suggest``, another worker's claim is the next point, not this one."""
    from dora_lab.study.grid import claim_grid_point
    from dora_lab.study.runner import open_study

    setup = prepare(COLA, [f"output_dir={tmp_path}", "study.sampler=grid", "study.n_trials=null",
                           "study.space={adapter.r0: {type: categorical, choices: [1, 2]}, "
                           "seed: {type: categorical, choices: [0, 1]}}"])
    study = open_study(setup)
    first = claim_grid_point(setup.study, study, setup.storage)
    assert first is not None
    first.suggest_categorical("adapter.r0", [1, 2])  # the first key only: the worker is mid-way
    second = claim_grid_point(setup.study, study, setup.storage)
    assert second is not None
    assert suggest(first, setup.study.space) == {"adapter.r0": 1, "seed": 0}
    assert suggest(second, setup.study.space) == {"adapter.r0": 1, "seed": 1}


def test_grid_with_changed_choices_runs_its_new_points(tmp_path: Path) -> None:
    """Points that left the grid do not count as done: [0, 1, 2] finished, then [2, 3, 4] runs 3, 4."""
    from dora_lab.study.grid import trials_to_run
    from dora_lab.study.runner import open_study

    def grid(choices: str):  # type: ignore[no-untyped-def]
        return prepare(COLA, [f"output_dir={tmp_path}", "study.sampler=grid", "study.n_trials=null",
                              f"study.space={{seed: {{type: categorical, choices: {choices}}}}}"])

    first = grid("[0, 1, 2]")
    study = open_study(first)
    assert trials_to_run(first.study, study) == 3
    study.optimize(lambda t: float(suggest(t, first.study.space)["seed"]), n_trials=3)
    second = grid("[2, 3, 4]")
    assert trials_to_run(second.study, open_study(second)) == 2


def test_a_searched_scorer_drops_the_base_scorers_params() -> None:
    """Sampled values follow the --set rule: a new scorer.name does not inherit cola's beta (a
    magnitude hyper-parameter smoothed_uncertainty does not take); its own params still apply."""
    setup = prepare(COLA)
    assert setup.base.scorer.params == {"beta": 0.9}
    cfg = trial_config(setup.data, setup.study, {"scorer.name": "smoothed_uncertainty"}, setup.cli)
    assert cfg.scorer.name == "smoothed_uncertainty" and cfg.scorer.params == {}
    cfg = trial_config(setup.data, setup.study, {"scorer.name": "sensitivity", "scorer.params.beta": 0.5}, setup.cli)
    assert cfg.scorer.params == {"beta": 0.5}
    # the number rule of --set reaches the trials too (on a key the study does not search)
    cli = prepare(COLA, ["study.space={train.lr: {type: float, low: 1.0e-3, high: 2.0e-3}}", "scorer.params.beta=9e-1"])
    assert cli.base.scorer.params == {"beta": 0.9}


def test_a_changed_categorical_is_refused_before_any_trial(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Optuna cannot change a categorical's choices within one study; the runner says so (exit 2)
    and names the fix instead of failing every new trial."""
    from dora_lab.study.runner import main, open_study
    from tests.tiny import COLA as COLA_DATA

    sets = [f"output_dir={tmp_path}", f"task.data_dir={COLA_DATA}", "study.sampler=grid", "study.n_trials=null"]
    first = prepare(COLA, [*sets, "study.space={seed: {type: categorical, choices: [0, 1]}}"])
    study = open_study(first)
    study.optimize(lambda t: float(suggest(t, first.study.space)["seed"]), n_trials=2)
    argv = [str(COLA), *(x for s in [*sets, "study.space={seed: {type: categorical, choices: [0, 1, 2]}}"]
                         for x in ("--set", s))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "study.space.seed: the choices [0, 1, 2] differ" in err and "--set study.name=cola_v2" in err
    assert len(open_study(first).trials) == 2  # nothing added


def test_a_set_of_a_searched_key_is_refused_with_the_fix() -> None:
    # cola's study searches train.lr: the sampled value would silently replace the --set one
    message = error(["train.lr=1e-3"])
    assert message.startswith("--set train.lr=0.001: the study searches 'train.lr' (study.space.train.lr)")
    assert "--set 'study.space.train.lr={type: categorical, choices: [0.001]}'" in message
    # the fix it names works, and a key the study does not search is still set
    setup = prepare(COLA, ["study.space.train.lr={type: categorical, choices: [0.001]}", "train.epochs=1"])
    assert setup.study.space["train.lr"].choices == [0.001] and setup.base.train.epochs == 1  # type: ignore[union-attr]


def test_searched_scorer_params_every_searched_scorer_takes_are_checked_before_any_trial() -> None:
    """``beta`` searched with scorer.name: smoothed_uncertainty (beta1, beta2) would fail every one of
    its trials, so the study is refused at once, naming the scorer, the parameter and what it takes."""
    both = ["study.space.scorer.name={type: categorical, choices: [magnitude, smoothed_uncertainty]}",
            "study.space.scorer.params.beta={type: float, low: 0.7, high: 0.95}"]
    assert error(both) == (
        "study.space.scorer.params.beta: scorer 'smoothed_uncertainty' (one of study.space.scorer.name's choices) "
        "has no hyper-parameter 'beta'; it takes: beta1 (default 0.85), beta2 (default 0.85).  Every trial of "
        "'smoothed_uncertainty' would fail: search only parameters every searched scorer takes, or give each "
        "scorer its own study")
    # the base config's scorer when scorer.name is not searched (cola's space searches scorer.params.beta)
    assert "scorer 'smoothed_uncertainty' (the base config's) has no hyper-parameter 'beta'" in error(
        ["scorer.name=smoothed_uncertainty"])
    # what every searched scorer takes is accepted: beta by the function scorers, beta1 by the class one
    assert prepare(COLA, [both[0].replace("smoothed_uncertainty", "sensitivity"), both[1]]).study.space
    assert prepare(COLA, ["scorer.name=smoothed_uncertainty", "study.space={scorer.params.beta1: "
                                                              "{type: float, low: 0.5, high: 0.9}}"]).study.space


def test_the_study_block_is_read_without_optuna_mlflow_or_the_runner() -> None:
    """Reports resolve a study config through plan.setup: neither Optuna, MLflow nor the runner loads."""
    import subprocess
    import sys

    code = ("import sys; from dora_lab.plan.setup import prepare; s = prepare(sys.argv[1]); "
            "print(s.name, [m for m in ('optuna', 'mlflow', 'dora_lab.study.runner') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(COLA)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cola", "[]"]
