"""Every ```python block of the docs and the README runs, so the docs cannot rot.

The blocks of one page run in order in one namespace (a page builds on its earlier blocks),
in a temporary working directory. A block preceded by ``<!-- skip-test: reason -->`` is not
run: that is for code of other packages (mup, Modula) that CI does not install. Blocks
fenced as ``bash``, ``text`` or anything but ``python`` are never run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]

_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"^\s*<!--\s*skip-test:(.*?)-->\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the block's first code line in the page
    skip: str | None  # the reason given by a skip-test comment, if any


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text, with the skip-test reason that precedes each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m.groups()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(prev)
        if skip and not skip.group(1).strip():
            raise ValueError(
                f"line {i + 1}: the skip-test comment before this fence gives no reason"
            )
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(ticks):
            # code of a fence inside a list item is indented like the fence
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: code fence is never closed")
        reason = skip.group(1).strip() if skip else None
        blocks.append(Block(lang.lower(), "\n".join(body), i + 2, reason))
        i = j + 1
    return blocks


def _runnable(page: Path) -> list[Block]:
    return [b for b in extract_blocks(page.read_text(encoding="utf-8")) if b.lang == "python"]


def test_extract_blocks_finds_fences_languages_and_skips() -> None:
    text = (
        "# title\n"
        "```python\nx = 1\n```\n"
        "text\n"
        "<!-- skip-test: needs mup -->\n\n"
        "```python\nimport mup\n```\n"
        "```bash\nmodnorm demo\n```\n"
        "- item\n\n    ```python\n    y = x + 1\n    ```\n"
    )
    blocks = extract_blocks(text)
    assert [(b.lang, b.code, b.line, b.skip) for b in blocks] == [
        ("python", "x = 1", 3, None),
        ("python", "import mup", 9, "needs mup"),
        ("bash", "modnorm demo", 12, None),
        ("python", "y = x + 1", 17, None),
    ]
    with pytest.raises(ValueError, match="no reason"):
        extract_blocks("<!-- skip-test: -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        extract_blocks("```python\npass\n")


def test_the_docs_have_code_to_run() -> None:
    """Guards the collection itself: the pages that teach by code still have code."""
    counts = {p.name: sum(b.skip is None for b in _runnable(p)) for p in PAGES}
    for name in ("README.md", "index.md", "concepts.md", "tutorial.md", "optimizers.md"):
        assert counts.get(name, 0) > 0, f"{name} has no python block that runs"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The docs' networks are tiny: with two threads each small op pays OpenMP's hand-off,
    and this file took 5× the CPU time (38 s against 7.5 s user, on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WITH_CODE = [p for p in PAGES if any(b.skip is None for b in _runnable(p))]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("page", WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in WITH_CODE])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in _runnable(page) if b.skip is None]
    monkeypatch.chdir(tmp_path)  # figures and files a page writes land here
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks:
        # Pad with blank lines so that a traceback names the page's own line numbers.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), namespace)
