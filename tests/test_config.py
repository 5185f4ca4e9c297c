"""Config loading: every error is refused before anything starts, naming the key's dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from dora_lab.run.config import flatten, load_config, load_config_dict
from dora_lab.run.config_yaml import ConfigError, apply_overrides, load_yaml

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_matches_the_issue() -> None:
    cfg = load_config(REPO / "configs" / "cola.yaml")
    assert cfg.task.name == "cola"
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert (cfg.scorer.name, cfg.schedule.name) == ("magnitude", "dora")
    assert (cfg.adapter.r0, cfg.budget.target_rank) == (3, 2)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=1e-3"], "train.lrr: unknown key; allowed here: method, epochs"),
        (["trian.lr=1e-3"], "trian: unknown key"),
        (["train.batch_size=many"], "train.batch_size: Input should be a valid integer"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["schedule.warmup=0.6", "schedule.final=0.5"], "schedule: warmup (0.6) + final (0.5) >= 1"),
        (["budget.target_rank=4"], "budget.target_rank (4.0) is above the start rank adapter.r0 (3)"),
        (["scorer.name=movement"], "unknown scorer 'movement'; registered scorers: magnitude, "),
        (["schedule.name=cosine"], "unknown schedule 'cosine'; registered schedules: adalora, constant"),
        (["scorer.params.gamma=2"], "scorer 'magnitude' has no hyper-parameter(s) ['gamma']; it takes: beta"),
        (["scorer.params.beta=1.5"], "beta must be in [0, 1)"),
        (["regularizer.name=l3"], "unknown regularizer 'l3'"),
        (["task.name=glue"], "task.name: unknown task 'glue'; choose one of: cola, sst2, mrpc, stsb, qqp, "
                             "mnli, qnli, rte, cola_prompt, sst2_prompt, mrpc_prompt, qqp_prompt, mnli_prompt, "
                             "qnli_prompt, rte_prompt, instruct, chat (the registered tasks)"),
        (["model.precision=fp8"], "model.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        (["plugins=[missing_plugin.py]"], "plugin file 'missing_plugin.py' does not exist"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "cola.yaml", overrides)
    assert needle in str(err.value)


def test_set_overrides_parse_yaml_values() -> None:
    data = apply_overrides({}, ["train.lr=3e-4", "adapter.targets=[query, value]", "task.data_dir="])
    assert data == {"train": {"lr": 3e-4}, "adapter": {"targets": ["query", "value"]}, "task": {"data_dir": None}}
    with pytest.raises(ConfigError, match="expects key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_base_include_overrides_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("seed: 3\ntrain: {lr: 0.01, epochs: 2}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {lr: 0.02}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.train.lr, cfg.train.epochs) == (3, 0.02, 2)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_target_params_replaces_default_rank_and_flatten() -> None:
    cfg = load_config_dict({"budget": {"target_params": 50000}})
    assert cfg.budget.target_rank is None and cfg.budget.target_params == 50000
    assert load_config_dict({"budget": {"target_params": "0.34M"}}).budget.target_params == 340_000
    assert load_config_dict({"budget": {"target_params": "76.8k"}}).budget.target_params == 76_800
    with pytest.raises(ConfigError, match="budget.target_params: 'lots' is not a parameter count"):
        load_config_dict({"budget": {"target_params": "lots"}})
    flat = flatten(cfg.resolved())
    assert flat["budget.target_params"] == 50000 and flat["train.lr"] == cfg.train.lr


def test_a_new_scorer_does_not_inherit_the_old_ones_params(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "cola.yaml", ["scorer.name=smoothed_uncertainty"])
    assert cfg.scorer.params == {}
    cfg = load_config(REPO / "configs" / "cola.yaml", ["scorer.name=smoothed_uncertainty", "scorer.params.beta1=0.5"])
    assert cfg.scorer.params == {"beta1": 0.5}
    (tmp_path / "c.yaml").write_text(f"base: {REPO / 'configs' / 'cola.yaml'}\nscorer: {{name: sensitivity}}\n")
    assert load_config(tmp_path / "c.yaml").scorer.params == {}


def test_a_key_written_twice_is_refused_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "twice.yaml").write_text("seed: 1\ntrain:\n  lr: 0.01\n  epochs: 2\n  lr: 0.02\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "twice.yaml")
    assert str(err.value) == (f"config {str(tmp_path / 'twice.yaml')!r}, line 5: key 'lr' is written twice (lines 3 "
                              "and 5); YAML would silently keep only the last one: remove or rename one of them")
    # in a base file too, and at the top level
    (tmp_path / "base.yaml").write_text("seed: 1\nseed: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base.yaml', line 2: key 'seed' is written twice \(lines 1 and 2\)"):
        load_config(tmp_path / "child.yaml")
    # a YAML merge key may override on purpose; the same key in two mappings is no repeat
    (tmp_path / "merge.yaml").write_text("x: &d {lr: 0.01, epochs: 2}\ntrain:\n  <<: *d\n  lr: 0.03\n")
    data = load_yaml(tmp_path / "merge.yaml")
    assert data["train"] == {"lr": 0.03, "epochs": 2}


def test_field_at_is_the_one_walker_of_the_schema() -> None:
    import doctest

    from dora_lab.run import config
    from dora_lab.run.config import TrainConfig, field_at

    assert doctest.testmod(config).failed == 0
    train = field_at("train")
    assert train is not None and train.annotation is TrainConfig
    assert field_at(["schedule", "warmup"]) is not None and field_at("scorer.params.beta") is None  # free mapping
    with pytest.raises(ConfigError, match=r"'lrx' is not a key of train \(allowed: method, epochs"):
        field_at("train.lrx")
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        field_at("seed.x")
    with pytest.raises(ConfigError, match=r"'study' is not a key of the top level \(allowed: seed, output_dir"):
        field_at("study.n_trials", hidden=("study",))


def test_the_study_block_merges_by_its_own_rule_along_base(tmp_path: Path) -> None:
    """One reader of the base: chain: within study:, a file's space/sampler/pruner replace its base's,
    overrides merge by key, and study: null keeps the base's block."""
    from dora_lab.run.config_yaml import read_yaml

    (tmp_path / "base.yaml").write_text(
        "study:\n  n_trials: 4\n  sampler: {name: tpe, seed: 1}\n  overrides: {train.epochs: 2, seed: 3}\n"
        "  space:\n    train.lr: {type: float, low: 0.1, high: 0.2}\n")
    (tmp_path / "grid.yaml").write_text(
        "base: base.yaml\nstudy:\n  sampler: {name: grid}\n  overrides: {seed: 5}\n"
        "  space:\n    seed: {type: categorical, choices: [0, 1]}\n")
    (tmp_path / "same.yaml").write_text("base: grid.yaml\nstudy: null\n")
    for name in ("grid.yaml", "same.yaml"):
        assert read_yaml(tmp_path / name)["study"] == {
            "n_trials": 4, "sampler": {"name": "grid"}, "overrides": {"train.epochs": 2, "seed": 5},
            "space": {"seed": {"type": "categorical", "choices": [0, 1]}}}
    (tmp_path / "bad.yaml").write_text("base: base.yaml\nstudy: [n_trials]\n")
    with pytest.raises(ConfigError, match="study must be a mapping of keys, got list"):
        read_yaml(tmp_path / "bad.yaml")


def test_a_run_builds_its_method_once_and_a_second_controller_gets_its_own() -> None:
    """Checking the config builds the method (its constructor refuses a bad method.params before any
    work); the run's controller takes that same object (issue 26: one build per run, not two).  A
    second controller, or a block changed since its check, gets a method of its own."""
    import torch

    from dora_lab import AllocationMethod, RankOneLinear, register_method
    from dora_lab.core.methods import METHODS
    from dora_lab.run.config import build_controller

    built: list[AllocationMethod] = []

    @register_method("counted_once")
    class Counted(AllocationMethod):
        def __init__(self, k: int = 1) -> None:
            self.k = k
            built.append(self)

    try:
        cfg = load_config_dict({"method": {"name": "counted_once", "params": {"k": 2}}})
        assert len(built) == 1
        layers = {"a": RankOneLinear(torch.nn.Linear(4, 3), r0=3, dropout=0.0)}
        assert build_controller(cfg, layers, 20).method is built[0] and len(built) == 1
        second = build_controller(cfg, layers, 20)  # the checked one is bound to the first controller
        assert second.method is built[1] and len(built) == 2
        changed = load_config_dict({"method": {"name": "counted_once", "params": {"k": 2}}})
        changed.method.params = {"k": 3}  # after its check
        assert build_controller(changed, layers, 20).method.k == 3  # type: ignore[attr-defined]
        assert len(built) == 4 and built[3].k == 3  # type: ignore[attr-defined]
        with pytest.raises(ConfigError, match=r"method\.params: .*'j'"):
            load_config_dict({"method": {"name": "counted_once", "params": {"j": 1}}})
    finally:
        METHODS.remove("counted_once")
