"""The documentation: every link and repository path that the README, docs/, examples/ and the code
point to exists in a fresh clone (nothing in ``../shared``), the site builds with MkDocs' strict
checks, and the config reference matches the config models."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dora_lab.run.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "site", "build", "dora_lab.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache",
        ".ruff_cache", "outputs", "runs", "mlruns"}
TOP = sorted(p.name for p in REPO.iterdir() if p.is_dir() and p.name not in SKIP and not p.name.startswith("."))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: a path into the repository: a top-level folder, then path characters; a glob (*), a brace list
#: ({json,md}) or a placeholder (<name>) right after it means the text names many files, not one
FOLDERS = "|".join(map(re.escape, TOP))
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{FOLDERS})/[\w./-]*+)(?![*{{<])")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
CODE_PATH = re.compile(r"(?<![\w./-])((?:docs|examples|configs|studies|scripts|benchmarks)/[\w./-]*"
                       r"\.(?:md|py|yaml|json|sh|csv|png))")
#: ../shared holds the design notes and, on the CI machine, an offline copy of GLUE's data: a data
#: folder may be named (as in the two commands), a document there may not
SHARED_DOCUMENT = re.compile(r"\.\./shared/(?!data/)|ALGORITHMS\.md|DESIGN\.md")


def files(*suffixes: str) -> Iterator[Path]:
    for path in sorted(REPO.rglob("*")):
        parts = path.relative_to(REPO).parts
        if path.is_file() and path.suffix in suffixes and not SKIP.intersection(parts):
            yield path


def markdown() -> list[Path]:
    return list(files(".md"))


def code() -> list[Path]:
    return [p for p in files(".py", ".yaml", ".yml", ".sh") if p.parts[len(REPO.parts)] != "tests"
            or p.name != "test_docs.py"]  # this file names what it forbids


def exists(target: str, page: Path) -> bool:
    """A path written on ``page`` exists relative to the page's folder or to the repository root."""
    target = target.split("#")[0].rstrip(".,:;")
    return not target or (page.parent / target).exists() or (REPO / target).exists()


def test_every_markdown_link_points_at_a_file() -> None:
    broken = [f"{page.relative_to(REPO)}: {target}" for page in markdown() for target in LINK.findall(page.read_text())
              if not re.match(r"[a-z][a-z0-9+.-]*:|#", target) and not (page.parent / target.split("#")[0]).exists()]
    assert not broken, f"links to nothing: {broken}"


def paths_in_code_spans(text: str) -> list[str]:
    """The repository paths written as code (`configs/cola.yaml`, in a command too)."""
    return [m for span in CODE_SPAN.findall(text) for m in REPO_PATH.findall(span)]


def test_every_repository_path_in_the_docs_exists() -> None:
    missing = [f"{page.relative_to(REPO)}: {m}" for page in markdown() for m in paths_in_code_spans(page.read_text())
               if not exists(m, page)]
    assert not missing, f"paths that do not exist in the repository: {missing}"


def test_every_document_the_code_names_exists() -> None:
    missing = [f"{path.relative_to(REPO)}: {m}" for path in code() for m in CODE_PATH.findall(path.read_text())
               if not exists(m, path)]
    assert not missing, f"files named in code, configs or scripts that do not exist: {missing}"


def test_nothing_points_at_documents_outside_the_repository() -> None:
    """A fresh clone has no ../shared: the algorithms spec is docs/algorithms.md."""
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in [*markdown(), *code()]
             for n, line in enumerate(p.read_text().splitlines(), 1) if SHARED_DOCUMENT.search(line)]
    assert not found, f"pointers to documents outside the repository: {found}"
    assert (REPO / "docs" / "algorithms.md").is_file()


def test_the_path_patterns_on_hand_made_text(tmp_path: Path) -> None:
    """What the checks take for a path, and what they leave alone."""
    text = ("see `docs/methods.md`, docs/algorithms.md; `benchmarks/results/bench_speed.{json,md}`, "
            "`studies/ablation_*.yaml`, `studies/<name>/trial-NNN`, `python scripts/no_such.py --x`, "
            "`http://x/docs/y.md`, | dora_lab/default cpu |")
    assert paths_in_code_spans(text) == ["docs/methods.md", "scripts/no_such.py"]
    assert [exists(m, REPO / "README.md") for m in paths_in_code_spans(text)] == [True, False]
    assert SHARED_DOCUMENT.search("`../shared/ALGORITHMS.md`") and not SHARED_DOCUMENT.search(
        "--set task.data_dir=../shared/data/glue/cola")


# -- the site ------------------------------------------------------------------------------------
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_with_strict_link_checks(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "config_reference" / "index.html").is_file()


def test_a_link_to_a_missing_repository_file_fails_the_build() -> None:
    page = REPO / "docs" / "index.md"
    check = hooks().check_repo_links
    assert check("[setup](../scripts/setup.sh)", page) == "setup (`scripts/setup.sh`)"
    assert check("[x](methods.md#the-protocol) [y](https://example.org/a.md)", page) == \
        "[x](methods.md#the-protocol) [y](https://example.org/a.md)"  # MkDocs' own checks take these
    with pytest.raises(ValueError, match="'../scripts/no_such.sh' points at nothing"):
        check("[gone](../scripts/no_such.sh)", page)


def flat_keys(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """The leaf keys of a dumped default config (an empty mapping such as ``scorer.params`` is a leaf)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_the_config_reference_is_current_and_lists_every_key() -> None:
    module = hooks()
    page, _missing = module.reference()
    assert module.stale_reference() is None, module.stale_reference()
    in_page = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.M))
    defaults = set(flat_keys(RunConfig().model_dump())) - {"study", "report"}
    assert defaults <= in_page, sorted(defaults - in_page)
    assert {"study.n_trials", "study.sampler[name=tpe].n_startup_trials", "study.space.KEY.low",
            "report.reference"} <= in_page
