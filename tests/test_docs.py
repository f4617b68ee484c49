"""The project speaks of itself only: no "session", no "issue <number>" in what a reader reads.

Scanned: README.md, docs/ (Markdown), minfer/ (.py, .cpp, .md: docstrings, comments, CLI help),
lessons/README.md and every lesson notebook (markdown and code cells, and the text of their
stored outputs). How the project was made is git's business, not the reader's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BANNED = {
    "the word 'session'": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "an issue number": re.compile(r"\bissues?\s*#?\s*\d+|\bissue\s+#\w+", re.IGNORECASE),
}


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "lessons" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    for ext in ("py", "cpp", "md"):
        files += sorted((ROOT / "minfer").rglob(f"*.{ext}"))
    return [f for f in files if f.is_file()]


def _notebook_texts(path: Path) -> list[tuple[str, str]]:
    """(where, text) for each cell's source and each of its outputs' text."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, cell in enumerate(nb["cells"]):
        out.append((f"cell {i}", "".join(cell.get("source", ""))))
        for o in cell.get("outputs", []):
            text = o.get("text") or o.get("data", {}).get("text/plain", "")
            out.append((f"cell {i} output", "".join(text) if isinstance(text, list) else str(text)))
    return out


def _findings(where: str, text: str) -> list[str]:
    found = []
    for what, pattern in BANNED.items():
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{where}:{line}: {what}: {m.group(0)!r}")
    return found


def find_banned() -> list[str]:
    found = []
    for f in _text_files():
        found += _findings(str(f.relative_to(ROOT)), f.read_text(encoding="utf-8"))
    for nb in sorted((ROOT / "lessons").glob("*.ipynb")):
        for where, text in _notebook_texts(nb):
            found += _findings(f"{nb.relative_to(ROOT)} {where}", text)
    return found


@pytest.mark.parametrize("text, hits", [
    ("No GPU was lent to this session.", 1),
    ("Sessions 5 and 7 measured it", 1),
    ("as issue 13 asks; see Issue #24 and issues 3", 3),
    ("requests.Session() keeps a connection", 1),
    ("an aiohttp ClientSession, a sessionless cookie", 0),
    ("the issue of padding; 13 issues", 0),
])
def test_the_patterns_catch_what_they_should(text, hits):
    assert len(_findings("x", text)) == hits


def test_the_scan_reads_every_kind_of_file():
    names = {f.suffix for f in _text_files()}
    assert {".md", ".py", ".cpp"} <= names
    assert len(list((ROOT / "lessons").glob("*.ipynb"))) >= 11


def test_no_session_or_issue_number_in_readme_docs_code_or_lessons():
    found = find_banned()
    assert not found, "the project must speak of itself only:\n" + "\n".join(found)
