"""The docs run as written: every Python block of README.md and docs/*.md is executed.

A block whose first line is a comment starting with "# not run in tests:" says why it is
exempt (a signature listing, a GPU or peer-library run) and is only compiled. Shell blocks
are not run. Links between the pages must resolve inside the repository.
"""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXEMPT = "# not run in tests:"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for i, match in enumerate(BLOCK.finditer(text)):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(page, match.group(1), id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("page, code", list(_blocks()))
def test_python_block_runs(page, code, tmp_path, monkeypatch):
    compiled = compile(code, f"{page.name}", "exec")
    if code.lstrip().startswith(EXEMPT):
        return
    monkeypatch.chdir(tmp_path)  # blocks may write files (model.onnx, quant.json)
    exec(compiled, {"__name__": "__docs__"})


def test_every_page_has_some_runnable_python_or_none_at_all():
    # an exempt block must say why: the marker is followed by a reason
    for page in PAGES:
        for match in BLOCK.finditer(page.read_text(encoding="utf-8")):
            first = match.group(1).lstrip().splitlines()[0]
            if first.startswith(EXEMPT):
                assert len(first) > len(EXEMPT) + 3, f"{page.name}: exempt block without a reason"


def test_links_stay_inside_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "shared/" not in text and "../shared" not in text, f"{page.name} points outside the repository"
        for target in link.findall(text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name}: broken link {target}"
            assert ROOT in path.parents or path == ROOT, f"{page.name}: link {target} leaves the repository"
