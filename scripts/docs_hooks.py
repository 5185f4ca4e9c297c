"""MkDocs hooks for the documentation site (mkdocs.yml names this file under ``hooks:``).

- ``docs/config_reference.md`` is generated from the pydantic models that validate a config
  (:class:`dora_lab.run.config.RunConfig`, the ``study:`` block's
  :class:`dora_lab.plan.space.StudyConfig`, the ``report:`` block's
  :class:`dora_lab.plan.report_block.ReportConfig`): every key with its type, default, limits and
  ``Field(description=...)``.  It is committed (a fresh clone and GitHub show it) and the build
  fails when it no longer matches the code, saying to run ``python scripts/docs_hooks.py --write``
  (``tests/test_docs.py`` checks the same).
- A link from a page to a repository file outside ``docs/`` (``../configs/cola.yaml``) is checked
  here, since MkDocs only knows the files under ``docs/``: a target that does not exist fails the
  build (as MkDocs' own strict check does for pages), one that exists becomes the path as code.

``python scripts/docs_hooks.py [--write]`` prints (or writes) the reference and, on stderr, the keys
without a description.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "config_reference.md"
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
_LIMITS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "at least", "max_length": "at most"}


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``int | None``, ``'fp32' | 'bf16'``."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def limits(field: FieldInfo) -> str:
    """The field's numeric and length limits (``>= 8``), from its pydantic metadata."""
    found = [f"{word} {getattr(m, key)}" for m in field.metadata for key, word in _LIMITS.items()
             if getattr(m, key, None) is not None]
    return ", ".join(found)


def default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return f"`{text}`"  # as it is written in a config file


def section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def optional_section(annotation: Any) -> type[BaseModel] | None:
    """The model of an optional section (``task.dataset: DatasetConfig | None``), else None."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    models = [a for a in args if section_model(a)]
    return models[0] if len(models) == 1 and len(args) == 2 and type(None) in args else None


def variants(annotation: Any) -> list[type[BaseModel]]:
    """The models of a discriminated union (``sampler: tpe | random | grid``), else []."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return [a for a in args if section_model(a)]


def rows(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf key of ``model`` under ``prefix`` with its field; sections are walked into,
    a union of models (a sampler, a pruner) once per variant, named by its ``name``."""
    for key, field in model.model_fields.items():
        path = f"{prefix}{key}"
        if (sub := section_model(field.annotation)) is not None:
            yield from rows(sub, path + ".")
        elif (sub := optional_section(field.annotation)) is not None:  # null, or a section of these keys
            yield path, field
            yield from rows(sub, path + ".")
        elif options := variants(field.annotation):
            for option in options:  # its `name` is in the key: study.sampler[name=tpe].seed
                name = typing.get_args(option.model_fields["name"].annotation)[0]
                yield from ((p, f) for p, f in rows(option, f"{path}[name={name}].") if not p.endswith("].name"))
        else:
            yield path, field


def blocks() -> list[tuple[str, str, type[BaseModel], str]]:
    """(title, key prefix, model, what it is) of each part of a config file."""
    from dora_lab.plan.report_block import ReportConfig
    from dora_lab.plan.space import CategoricalParam, FloatParam, IntParam, StudyConfig
    from dora_lab.run.config import RunConfig

    return [
        ("The run", "", RunConfig, "One training run (`python -m dora_lab.train`); every trial of a study is one."),
        ("The study block", "study.", StudyConfig, "What a study searches and how (`python -m dora_lab.study`)."),
        ("A searched key: float", "study.space.KEY.", FloatParam, "A distribution in `study.space`."),
        ("A searched key: int", "study.space.KEY.", IntParam, "A distribution in `study.space`."),
        ("A searched key: categorical", "study.space.KEY.", CategoricalParam, "A distribution in `study.space`."),
        ("The report block", "report.", ReportConfig, "How `python -m dora_lab.report` compares a study's groups."),
    ]


def reference() -> tuple[str, list[str]]:
    """The reference page's Markdown, and the keys that have no description yet."""
    missing: list[str] = []
    out = ["# Config reference", "",
           "Generated from the pydantic models that validate a config (`dora_lab/run/config.py`, `dora_lab/plan/report_block.py`,",
           "`dora_lab/plan/space.py`) when the site is built, so it always matches the code. How a config",
           "file is written, `base:` chains and `--set`: [configuration.md](configuration.md).", ""]
    for title, prefix, model, what in blocks():
        out += [f"## {title}", "", what, "", "| key | type | default | limits | description |",
                "| --- | --- | --- | --- | --- |"]
        for path, field in rows(model, prefix):
            if path in ("study", "report"):
                continue  # documented by their own blocks below
            if not field.description and path not in missing:
                missing.append(path)
            text = (field.description or "").replace("|", "\\|")
            out.append(f"| `{path}` | `{type_name(field.annotation).replace('|', chr(92) + '|')}` | "
                       f"{default_of(field).replace('|', chr(92) + '|')} | {limits(field)} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n", missing


def check_repo_links(markdown: str, page: Path) -> str:
    """Links from ``page`` (a file under docs/) to repository files outside docs/: an existing target
    becomes its path as code; a missing one raises (the build fails)."""
    docs = REPO / "docs"

    def fix(match: re.Match[str]) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        resolved = (page.parent / target.split("#")[0]).resolve()
        if resolved.is_relative_to(docs):
            return match.group(0)  # MkDocs checks these
        if not resolved.exists():
            raise ValueError(f"{page.relative_to(REPO)}: the link to {target!r} points at nothing in the repository")
        return f"{text} (`{resolved.relative_to(REPO).as_posix()}`)" if text.strip("`") != \
            resolved.relative_to(REPO).as_posix() else f"`{resolved.relative_to(REPO).as_posix()}`"

    return _LINK.sub(fix, markdown)


# -- the hooks ---------------------------------------------------------------------------------
def stale_reference() -> str | None:
    """Why docs/config_reference.md does not match the code (None: it does)."""
    if REFERENCE.is_file() and REFERENCE.read_text() == reference()[0]:
        return None
    return ("docs/config_reference.md does not match the config models in the code: regenerate it with "
            "`.venv/bin/python scripts/docs_hooks.py --write` and commit it")


def on_pre_build(config: Any) -> None:
    if (why := stale_reference()) is not None:
        from mkdocs.exceptions import PluginError

        raise PluginError(why)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    try:
        return check_repo_links(markdown, Path(page.file.abs_src_path))
    except ValueError as exc:
        from mkdocs.exceptions import PluginError

        raise PluginError(str(exc)) from exc


if __name__ == "__main__":
    page, undescribed = reference()
    if sys.argv[1:] == ["--write"]:
        REFERENCE.write_text(page)
        print(f"wrote {REFERENCE.relative_to(REPO)}", file=sys.stderr)
    else:
        print(page, end="")
    print(f"{len(undescribed)} keys without a description: {', '.join(undescribed)}", file=sys.stderr)
