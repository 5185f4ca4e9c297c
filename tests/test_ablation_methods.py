"""studies/ablation_methods.yaml and its two arms validate as the study CLI reads them (without
running anything): every grid point's trial config is a valid run at the same parameter budget."""

from __future__ import annotations

import itertools
from pathlib import Path

from dora_lab.plan.setup import prepare, trial_config
from dora_lab.report.io import read_report_block, source_from_config

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
# MiniLM: 6 layers x (4 x (384 + 384 + 1) + 2 x (384 + 1536 + 1)) parameters per rank, at rank 2
LORA_R2_PARAMS = 6 * (4 * (384 + 384 + 1) + 2 * (384 + 1536 + 1)) * 2


def points(name: str) -> list[tuple[str, object]]:
    setup = prepare(STUDIES / name)
    grid = setup.study.grid()
    out = []
    for values in itertools.product(*grid.values()):
        cfg = trial_config(setup.data, setup.study, dict(zip(grid, values, strict=True)), setup.cli)
        out.append((setup.name, cfg))
    return out


def test_every_method_and_arm_validates_at_the_same_parameter_budget() -> None:
    main = points("ablation_methods.yaml")
    assert LORA_R2_PARAMS == 83016
    assert sorted({cfg.method.name for _, cfg in main}) == ["alora", "dora", "dylora", "eva", "increlora", "sora"]
    assert len(main) == 18 and {cfg.seed for _, cfg in main} == {0, 1, 2}
    fisher = points("ablation_methods_fisher.yaml")
    assert len(fisher) == 3 and {cfg.method.name for _, cfg in fisher} == {"fisher"}
    for _, cfg in main + fisher:  # the fisher arm is trained exactly as the main file's arms
        assert cfg.model_dump(exclude={"seed", "method", "output_dir", "report"}) == main[0][1].model_dump(
            exclude={"seed", "method", "output_dir", "report"})
        assert cfg.budget.target_params == LORA_R2_PARAMS and cfg.budget.target_rank is None
        assert (cfg.adapter.r0, cfg.schedule.name, cfg.train.epochs, cfg.task.max_train_samples) == (3, "dora", 3, None)
    adalora = points("ablation_methods_adalora.yaml")
    assert len(adalora) == 3
    for _, cfg in adalora:
        assert (cfg.method.name, cfg.scorer.name, cfg.schedule.name, cfg.regularizer.name, cfg.adapter.init) == (
            "dora", "smoothed_uncertainty", "adalora", "orthogonal", "adalora")
        assert cfg.budget.target_params == LORA_R2_PARAMS
    lora = points("ablation_methods_lora.yaml")
    assert len(lora) == 3
    for _, cfg in lora:  # never prunes: its r0 is its budget, r0 x the per-rank parameters
        assert (cfg.schedule.name, cfg.adapter.r0) == ("constant", 2)


def test_the_report_pools_the_three_arms_against_plain_lora() -> None:
    block = read_report_block(STUDIES / "ablation_methods.yaml")
    assert block["include"] == ["ablation_methods_adalora.yaml", "ablation_methods_lora.yaml",
                                "ablation_methods_fisher.yaml"]
    assert block["reference"] == {"method.name": "dora", "schedule.name": "constant"}
    for name in ("ablation_methods.yaml", *block["include"]):
        source = source_from_config(STUDIES / name)
        assert source.name == name.removesuffix(".yaml") and source.metric == "matthews_correlation"


def test_the_decoder_ablation_arms_validate_at_the_same_parameter_budget() -> None:
    """scripts/decoder_methods_ablation.py: every arm is configs/smollm2_cola.yaml with the same
    GPU settings, every method plus AdaLoRA and LoRA at SmolLM2's rank-2 LoRA parameters."""
    import argparse
    import importlib.util

    from dora_lab import list_methods
    from dora_lab.run.config import load_config

    spec = importlib.util.spec_from_file_location("decoder_ablation", REPO / "scripts" / "decoder_methods_ablation.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(script.ARMS) == {*list_methods(), "adalora", "lora"}
    args = argparse.Namespace(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="../shared/data/glue/cola", steps=200,
                              set=[])
    configs = {arm: load_config(REPO / "configs" / "smollm2_cola.yaml", script.overrides(args, arm, 0))
               for arm in script.ARMS}
    # per rank, one (A row + B column + c) per matrix: q, o 576 -> 576; k, v 576 -> 192 (3 key/value
    # heads of 64); gate, up 576 -> 1536; down 1536 -> 576; 30 layers
    smollm2_rank2 = 2 * 30 * (2 * (576 + 576 + 1) + 2 * (576 + 192 + 1) + 3 * (576 + 1536 + 1))
    assert smollm2_rank2 == 610980
    for arm, cfg in configs.items():
        assert (cfg.train.max_steps, cfg.train.batch_size, cfg.model.precision, cfg.task.max_eval_samples) == (
            200, 32, "bf16", None), arm
        if arm == "lora":
            assert (cfg.schedule.name, cfg.adapter.r0, cfg.budget.target_rank) == ("constant", 2, 2.0)
        else:
            assert cfg.budget.target_params == smollm2_rank2 and cfg.adapter.r0 == 4, arm
    assert (configs["adalora"].scorer.name, configs["adalora"].schedule.name) == ("smoothed_uncertainty", "adalora")
