"""Functions a reader can hold in their head: none in ``minfer/`` runs over 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import minfer

ROOT = Path(minfer.__file__).parent
MAX_LINES = 80


def long_functions(root: Path = ROOT, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(``path:line name``, length in lines) of every function or method longer than ``limit``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append((f"{path.relative_to(root.parent)}:{node.lineno} {node.name}", length))
    return found


def test_no_function_over_80_lines():
    found = long_functions()
    assert not found, "functions over 80 lines: " + ", ".join(f"{name} ({n})" for name, n in found)


def test_the_finder_finds_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 80 + "\ndef g():\n    pass\n")
    assert [n for _, n in long_functions(tmp_path)] == [81]
