"""The package imports and its registries hold the built-ins."""

import dora_lab


def test_builtins_registered() -> None:
    assert {"magnitude", "sensitivity", "smoothed_uncertainty"} <= set(dora_lab.list_scorers())
    assert {"dora", "adalora", "linear", "constant"} <= set(dora_lab.list_schedules())
    assert {"dem", "orthogonal"} <= set(dora_lab.list_regularizers())
