"""What ``pip install .`` puts in site-packages, and the installed ``dora-lab`` command.

The wheel is built for real (setuptools, through pip) from a copy of the files that make it, and
read as a zip: its only top-level name must be ``dora_lab`` (methods/ and metrics/ go inside it as
``dora_lab.methods`` and ``dora_lab.metrics``, never as global ``methods``/``metrics`` modules that
other packages also use).  ``dora-lab TOOL`` is run as a real subprocess and compared with
``python -m dora_lab.TOOL``.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WHEEL_SOURCES = ("pyproject.toml", "setup.py", "README.md", "dora_lab", "methods", "metrics")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(out)], check=True, capture_output=True, text=True)
    (built,) = out.glob("dora_lab-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_only_dora_lab(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dora_lab"}, f"top-level names in site-packages besides dora_lab: {sorted(top - {'dora_lab'})}"
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["dora_lab"]


def test_the_wheel_holds_every_module_of_the_tree(wheel: zipfile.ZipFile) -> None:
    """Nothing is lost by the mapping: every .py of dora_lab/, methods/ and metrics/ is in the wheel,
    methods/ and metrics/ under dora_lab/ (so a new subpackage or a new built-in needs no edit)."""
    names = {n for n in wheel.namelist() if n.endswith(".py")}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "dora_lab").rglob("*.py")}
    for folder in ("methods", "metrics"):
        expected |= {f"dora_lab/{p.relative_to(REPO).as_posix()}" for p in (REPO / folder).rglob("*.py")}
    expected = {n for n in expected if "__pycache__" not in n}
    assert names == expected


def test_the_wheel_declares_the_dora_lab_command(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"dora-lab": "dora_lab.cli:main"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_dora_lab_tool_is_python_m_dora_lab_tool(tmp_path: Path) -> None:
    """Same main, same refusal, same exit code: a config that does not exist is bad input (2)."""
    missing = str(tmp_path / "no_such.yaml")
    for tool in ("train", "study"):
        via_command = run("-m", "dora_lab.cli", tool, missing)
        via_module = run("-m", f"dora_lab.{tool}", missing)
        assert via_command.returncode == via_module.returncode == 2, via_command.stderr
        assert via_command.stderr == via_module.stderr and "no_such.yaml" in via_command.stderr


def test_dora_lab_refuses_an_unknown_tool_naming_the_five() -> None:
    result = run("-m", "dora_lab.cli", "trian")
    assert result.returncode == 2
    assert "error: unknown tool 'trian'" in result.stderr
    assert "train, study, report, export, generate" in result.stderr
    for module in ("dora_lab.cli", "dora_lab"):  # python -m dora_lab is the same command
        listed = run("-m", module, "--help")
        assert listed.returncode == 0 and all(f"  {tool} " in listed.stdout for tool in
                                              ("train", "study", "report", "export", "generate"))
