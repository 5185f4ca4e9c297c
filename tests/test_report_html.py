"""report.md -> report.html: one file, its own pictures embedded, nothing loaded from elsewhere."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from dora_lab.report.html import markdown_to_html, write_html

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # the bytes are what is checked, not the picture


def test_pictures_are_embedded_and_tables_rendered(tmp_path: Path) -> None:
    (tmp_path / "a b.png").write_bytes(PNG)
    md = tmp_path / "report.md"
    md.write_text("# Report: x < y\n\n| g | n |\n|---|---|\n| magnitude | 3 |\n\n![the groups](a%20b.png)\n\n"
                  "<script>alert(1)</script>\n")
    page = write_html(md).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>Report: x &lt; y</title>" in page
    assert "<td>magnitude</td>" in page and "<th>g</th>" in page
    (src,) = re.findall(r'<img src="([^"]+)" alt="the groups"', page)
    assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1]) == PNG
    assert "<script>" not in page  # raw HTML in the Markdown stays text


@pytest.mark.parametrize("src", ["http://example.com/x.png", "/etc/x.png", "../x.png", "missing.png"])
def test_an_image_that_is_not_the_reports_own_file_is_refused(tmp_path: Path, src: str) -> None:
    (tmp_path.parent / "x.png").write_bytes(PNG)
    with pytest.raises(ValueError, match="is not a file in .*; a report embeds only its own pictures"):
        markdown_to_html(f"![p]({src})\n", tmp_path)
