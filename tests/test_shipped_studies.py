"""Every study file shipped in studies/ validates as the study CLI reads it: each grid point's trial
config is a valid run (nothing is trained)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dora_lab.plan.setup import prepare, trial_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_grid_point_of_a_shipped_study_is_a_valid_run(path: Path) -> None:
    setup = prepare(path)
    assert setup.study.sampler.name == "grid", path.name
    grid = setup.study.grid()
    points = list(itertools.product(*grid.values()))
    assert points
    for values in points:  # trial_config refuses a point that is not a valid run
        cfg = trial_config(setup.data, setup.study, dict(zip(grid, values, strict=True)), setup.cli)
        dumped = cfg.model_dump()
        for key, value in zip(grid, values, strict=True):  # the run has the point's values
            node = dumped
            for part in key.split("."):
                node = node[part]
            assert node == value, (path.name, key)
