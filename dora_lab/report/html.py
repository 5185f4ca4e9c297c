"""A report's ``report.md`` as one self-contained ``report.html``: its pictures embedded as base64
``data:`` URIs, so the file opens alike in a browser, in MLflow's artifact viewer (which shows
``report.md``'s image links as text) or as an e-mail attachment, with no file beside it.

Markdown -> HTML by ``markdown-it-py`` (CommonMark plus tables); only the report's own pictures are
embedded (files in the report's folder): any other image link is refused, so the HTML never loads
anything from elsewhere.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path
from urllib.parse import unquote

from markdown_it import MarkdownIt

__all__ = ["STYLE", "markdown_to_html", "write_html"]

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}"""

_IMG = re.compile(r'<img src="([^"]*)"')


def markdown_to_html(text: str, folder: Path, title: str = "") -> str:
    """``text`` (Markdown) as a whole HTML page whose images, files relative to ``folder``, are embedded.
    Raises :class:`ValueError` for an image that is not a file in ``folder``."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)

    def embed(match: re.Match[str]) -> str:
        src = unquote(html.unescape(match.group(1)))  # markdown-it percent-encodes link targets
        path = (folder / src).resolve()
        if "://" in src or src.startswith(("/", "data:")) or not path.is_relative_to(folder.resolve()) \
                or not path.is_file():
            raise ValueError(f"report image {src!r} is not a file in {folder}; a report embeds only its own pictures")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f'<img src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode("ascii")}"'

    body = _IMG.sub(embed, body)
    first = re.search(r"^# (.+)$", text, re.MULTILINE)
    name = html.escape(title or (first.group(1) if first else "report"))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{name}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def write_html(markdown: Path) -> Path:
    """Write ``<folder>/report.html`` beside ``markdown`` (its pictures embedded); returns its path."""
    out = markdown.with_suffix(".html")
    out.write_text(markdown_to_html(markdown.read_text(), markdown.parent), encoding="utf-8")
    return out
