"""Registries: name checks, clashes, unknown names, a user-defined scorer end to end (the README
example), plugin files, and hyper-parameter checks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import PLUGINS, adamw, adapted_bert, batches, train

import dora_lab
from dora_lab import (
    PruningController,
    RankOneLinear,
    RegistryError,
    Scorer,
    adapter_layers,
    get_regularizer,
    get_schedule,
    get_scorer,
    import_plugins,
    make_scorer,
    register_schedule,
    register_scorer,
)
from dora_lab.core.registry import Registry, discover_modules
from dora_lab.core.regularizers import REGULARIZERS
from dora_lab.core.schedules import SCHEDULES
from dora_lab.core.scorers import SCORERS


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Names to unregister (from every registry) when the test ends, pass or fail."""
    names: list[str] = []
    yield names
    for name in names:
        for registry in (SCORERS, SCHEDULES, REGULARIZERS):
            registry.remove(name)  # type: ignore[attr-defined]


def query_layer() -> RankOneLinear:
    """The first adapted layer of a tiny BERT with r0 = 2 (c = 0, A and B random)."""
    return adapter_layers(adapted_bert(0, r0=2))["bert.encoder.layer.0.attention.self.query"]


# -- the README example: a user-defined scorer, by name, end to end -----------------------------------
def test_user_defined_scorer_end_to_end(cleanup: list[str]) -> None:
    cleanup.append("weight_norm")

    @register_scorer("weight_norm")
    def weight_norm(component: RankOneLinear) -> torch.Tensor:
        """|c_i| ||B[:, i]|| ||A[i, :]||: the size of component i's update (weights only)."""
        return component.c.abs() * component.B.norm(dim=0) * component.A.norm(dim=1)

    model = adapted_bert(0)
    controller = PruningController(model, make_scorer("weight_norm"), "dora", 12, target_rank=1.5,
                                   warmup=2, final=3, interval=2)
    layers = controller.layers
    expected: dict[str, list[int]] = {}

    @torch.no_grad()
    def rank_by_hand(_: int) -> None:  # at the last pruning step, just before the controller runs
        if controller.t == 9:
            flat = [(float(layer.c[i].abs() * layer.B[:, i].norm() * layer.A[i].norm()), n, i)
                    for n, layer in layers.items() for i in range(layer.rank)]
            for _score, n, i in sorted(flat, reverse=True)[:18]:
                expected.setdefault(n, []).append(i)

    train(model, adamw(model), controller, batches(12), before_step=rank_by_hand)
    assert sum(controller.allocation().values()) == 18
    assert {n: layer.index.tolist() for n, layer in layers.items() if layer.rank} == {
        n: sorted(ix) for n, ix in expected.items()}
    assert "weight_norm" in dora_lab.list_scorers()


def test_plugins_in_tests_plugins_joined_the_matrix() -> None:
    assert [Path(p).name for p in PLUGINS] == ["matrix_plugins.py"]
    assert "plugin_movement" in dora_lab.list_scorers() and "plugin_cosine" in dora_lab.list_schedules()
    assert get_scorer("plugin_movement").needs_grad and get_scorer("plugin_movement").name == "plugin_movement"


# -- names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bad", "hint"), [("Top-K", " (for example 'top_k')"), ("a b", " (for example 'a_b')"),
                                           ("topk\n", " (for example 'topk')"), ("1st", ""), ("", "")])
def test_bad_names_are_refused_with_a_hint(bad: str, hint: str) -> None:
    with pytest.raises(RegistryError) as info:
        register_scorer(bad)(lambda component: component.c)
    assert str(info.value) == (f"invalid scorer name {bad!r}: use lowercase letters, digits and '_', "
                               f"starting with a letter{hint}")
    with pytest.raises(RegistryError, match="invalid schedule name"):
        register_schedule(bad)(lambda p, start, target: start)
    assert bad not in dora_lab.list_scorers()


def test_clash_says_how_to_fix_it(cleanup: list[str]) -> None:
    with pytest.raises(RegistryError, match=r"scorer 'magnitude' is already registered by dora_lab\.metrics\.magnitude\.magnitude; "
                                            r"pick another name, or pass replace=True"):
        register_scorer("magnitude")(lambda component: component.c.abs())
    with pytest.raises(RegistryError, match="schedule 'dora' is already registered by dora_lab.core.schedules.dora"):
        register_schedule("dora")(lambda p, start, target: start)
    assert get_scorer("magnitude").__module__ == "dora_lab.metrics.magnitude"

    cleanup.append("twice")

    def first(component):  # type: ignore[no-untyped-def]
        return component.c.abs()

    def second(component):  # type: ignore[no-untyped-def]
        return component.c.abs() + 1

    register_scorer("twice")(first)
    register_scorer("twice")(first)  # the same definition again (a re-run notebook cell) is fine
    with pytest.raises(RegistryError, match=r"'twice' is already registered by .*<locals>\.first; pick another"):
        register_scorer("twice")(second)
    register_scorer("twice", replace=True)(second)  # on purpose
    layer = query_layer()
    scorer = make_scorer("twice")
    scorer.update({"q": layer})
    assert scorer.scores()["q"].tolist() == [1.0, 1.0]


def test_clash_with_a_builtin_is_caught_before_the_builtins_are_loaded(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a built-in's name first must fail at once, not break the built-in's import later."""
    registry: Registry[object] = Registry("widget", "dora_lab.no_such_group", builtins=["widget_builtins_mod"])
    (tmp_path / "widget_builtins_mod.py").write_text(
        "import widget_registry_holder as h\n\ndef gear():\n    pass\n\nh.REGISTRY.add('gear', gear)\n")
    holder = type(sys)("widget_registry_holder")
    holder.REGISTRY = registry  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "widget_registry_holder", holder)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "widget_builtins_mod", raising=False)
    with pytest.raises(RegistryError, match="widget 'gear' is already registered by widget_builtins_mod.gear; pick"):
        registry.add("gear", [])
    assert registry.names() == ["gear"]


# -- built-ins found by discovery ------------------------------------------------------------------
def test_a_package_that_is_not_installed_says_how_to_refresh_the_install(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An editable install from before the dora_lab.metrics mapping: the fix, not a bare import error;
    a package that is there but fails on its own missing import keeps that error."""
    with pytest.raises(ModuleNotFoundError, match=r"'dora_lab\.no_such_builtins'.*pip install -e \. --no-deps"):
        discover_modules("dora_lab.no_such_builtins")
    (tmp_path / "broken_builtins").mkdir()
    (tmp_path / "broken_builtins" / "__init__.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        discover_modules("broken_builtins")
    assert caught.value.name == "no_such_dependency" and "pip install -e" not in str(caught.value)


def test_builtin_scorers_are_every_file_in_metrics() -> None:
    """The scorer registry imports every module of metrics/ (installed as dora_lab.metrics), computed
    here from the folder itself."""
    folder = Path(__file__).resolve().parents[1] / "metrics"
    on_disk = sorted(f"dora_lab.metrics.{p.stem}" for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert on_disk == ["dora_lab.metrics.magnitude", "dora_lab.metrics.sensitivity", "dora_lab.metrics.uncertainty"]
    assert discover_modules("dora_lab.metrics") == on_disk
    assert SCORERS._packages == ("dora_lab.metrics",) and SCORERS._builtins == ()
    assert {get_scorer(n).__module__ for n in ("magnitude", "sensitivity", "smoothed_uncertainty")} == set(on_disk)


def test_a_new_file_in_a_discovered_package_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping one file into the package is all it takes; a ``_private`` module is not imported."""
    registry: Registry[object] = Registry("widget", "dora_lab.no_such_group", packages=["widget_pkg"])
    holder = type(sys)("widget_pkg_holder")
    holder.REGISTRY = registry  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "widget_pkg_holder", holder)
    pkg = tmp_path / "widget_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("gear", "cog"):
        (pkg / f"{name}.py").write_text(f"import widget_pkg_holder as h\n\ndef {name}():\n    pass\n\n"
                                        f"h.REGISTRY.add({name!r}, {name})\n")
    (pkg / "_helper.py").write_text("raise RuntimeError('a private helper is not a built-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("widget_pkg", "widget_pkg.gear", "widget_pkg.cog"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    assert discover_modules("widget_pkg") == ["widget_pkg.cog", "widget_pkg.gear"]
    assert registry.names() == ["cog", "gear"]
    assert registry.get("cog").__module__ == "widget_pkg.cog"  # type: ignore[attr-defined]


def test_unknown_names_list_every_registered_name() -> None:
    for get, kind, names in ((get_scorer, "scorer", dora_lab.list_scorers()),
                             (get_schedule, "schedule", dora_lab.list_schedules()),
                             (get_regularizer, "regularizer", dora_lab.list_regularizers())):
        with pytest.raises(RegistryError) as info:
            get("nope")
        message = str(info.value)
        assert f"unknown {kind} 'nope'; registered {kind}s: {', '.join(names)}." in message
        assert f"@register_{kind}('nope')" in message
        assert isinstance(info.value, ValueError)


# -- shape checks at registration ---------------------------------------------------------------------
def test_registration_checks_the_shape_of_what_is_registered(cleanup: list[str]) -> None:
    cleanup.extend(["two_args", "abstract", "bad_sched", "wrong_shape"])
    with pytest.raises(RegistryError, match="must take exactly one argument"):
        register_scorer("two_args")(lambda layer, other: layer.c)

    class Half(Scorer):
        def scores(self) -> dict[str, torch.Tensor]:
            return {}

    with pytest.raises(RegistryError, match="does not implement update/scores"):
        register_scorer("abstract")(Half)
    with pytest.raises(RegistryError, match=r"must take exactly \(p, start, target\); it takes \(p, start\)"):
        register_schedule("bad_sched")(lambda p, start: start)  # type: ignore[arg-type,misc]
    register_scorer("wrong_shape")(lambda component: component.c.sum())
    layer = query_layer()
    with pytest.raises(ValueError, match=r"returned shape \(\) for layer 'q'; .* shape \(2,\)"):
        make_scorer("wrong_shape").update({"q": layer})


# -- plugins ------------------------------------------------------------------------------------------
def test_import_plugins_from_a_py_file(tmp_path: Path, cleanup: list[str]) -> None:
    cleanup.extend(["file_scorer", "file_schedule"])
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from dora_lab import register_scorer, register_schedule\n"
        "\n"
        "@register_scorer('file_scorer', beta=0.5)\n"
        "def file_scorer(component):\n"
        "    return component.c.abs() + 2.0\n"
        "\n"
        "@register_schedule('file_schedule')\n"
        "def file_schedule(p, start, target):\n"
        "    return target if p >= 0.5 else start\n"
    )
    import_plugins([str(plugin)])
    registered = get_scorer("file_scorer")
    import_plugins([str(plugin)])  # a second import (the next trial of a study) is a no-op, not a clash
    assert get_scorer("file_scorer") is registered
    scorer = make_scorer("file_scorer")
    assert scorer.beta == 0.5  # type: ignore[attr-defined]
    layer = query_layer()
    scorer.update({"q": layer})
    assert scorer.scores()["q"].tolist() == [1.0, 1.0]  # (1 - 0.5) * (0 + 2)
    assert get_schedule("file_schedule")(0.7, 10, 4) == 4

    with pytest.raises(RegistryError, match=r"plugin file '.*missing\.py' does not exist \(config key 'plugins'\)"):
        import_plugins([str(tmp_path / "missing.py")])
    with pytest.raises(RegistryError, match="cannot import plugin module 'no_such_pkg.mod'"):
        import_plugins(["no_such_pkg.mod"])


def test_a_plugin_file_that_failed_is_imported_again_once_fixed(tmp_path: Path, cleanup: list[str]) -> None:
    cleanup.append("fixed_scorer")
    plugin = tmp_path / "fragile.py"
    plugin.write_text("from dora_lab import register_scorer\nraise RuntimeError('a typo in the plugin')\n")
    with pytest.raises(RegistryError, match="line 2: RuntimeError: a typo in the plugin"):
        import_plugins([str(plugin)])
    plugin.write_text("from dora_lab import register_scorer\n"
                      "register_scorer('fixed_scorer')(lambda component: component.c.abs())\n")
    import_plugins([str(plugin)])
    assert "fixed_scorer" in dora_lab.list_scorers()


def test_import_plugins_from_a_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           cleanup: list[str]) -> None:
    cleanup.append("module_scorer")
    (tmp_path / "my_scorer_module.py").write_text(
        "from dora_lab import register_scorer\n"
        "register_scorer('module_scorer')(lambda component: component.c.abs())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_scorer_module", raising=False)
    import_plugins(["my_scorer_module"])
    assert "module_scorer" in dora_lab.list_scorers()


# -- hyper-parameters ---------------------------------------------------------------------------------
def test_make_scorer_checks_hyperparameters() -> None:
    with pytest.raises(ValueError, match=r"scorer 'magnitude' has no hyper-parameter\(s\) \['gamma'\]; "
                                         r"it takes: beta \(default 0.9\)"):
        make_scorer("magnitude", gamma=0.5)
    with pytest.raises(ValueError, match=r"has no hyper-parameter\(s\) \['beta'\]; it takes: beta1 \(default 0.85\), "
                                         r"beta2 \(default 0.85\)"):
        make_scorer("smoothed_uncertainty", beta=0.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\) or null, got 1.5"):
        make_scorer("sensitivity", beta=1.5)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got -0.1"):
        make_scorer("smoothed_uncertainty", beta1=-0.1)
    assert make_scorer("magnitude", beta=0.5).beta == 0.5  # type: ignore[attr-defined]
    assert make_scorer("sensitivity").beta is None  # type: ignore[attr-defined]
    tuned = make_scorer("smoothed_uncertainty", beta1=0.7)
    assert (tuned.beta1, tuned.beta2) == (0.7, 0.85)  # type: ignore[attr-defined]
    assert get_scorer("sensitivity").hyperparameters() == {"beta": None}
