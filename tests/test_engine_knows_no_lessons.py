"""The engine knows nothing of lessons: it takes what it runs as arguments.

* Only ``minfer.cli`` (its command table and ``--use-solutions``) imports ``minfer.lessons``.
* ``engine/`` and ``kv/`` hold no module-level hook (a name bound to None for someone to fill
  in) and never test a callable's identity against a function of the package: a different
  policy, slot layout or attention backend is passed in, and the engine calls it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from test_imports import ROOT, import_graph, module_name

def _engine_files() -> list[Path]:
    return sorted([*(ROOT / "engine").glob("*.py"), *(ROOT / "kv").glob("*.py")])


def _package_functions() -> set[str]:
    return {n.name for p in ROOT.rglob("*.py") for n in ast.parse(p.read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _identity_checks() -> set[tuple[str, str]]:
    """(module, function) for every ``x is f`` / ``x is not f`` in engine/ and kv/ against a function of minfer."""
    functions, found = _package_functions(), set()
    for path in _engine_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Is, ast.IsNot)) for o in node.ops):
                for side in (node.left, *node.comparators):
                    name = getattr(side, "id", None) or getattr(side, "attr", None)
                    if name in functions:
                        found.add((module_name(path), name))
    return found


def test_only_the_cli_imports_the_lessons():
    importers = {m for m, deps in import_graph().items() if not m.startswith("minfer.lessons")
                 and any(d.startswith("minfer.lessons") for d in deps)}
    assert importers == {"minfer.cli"}, importers


def test_the_engine_holds_no_module_level_hook():
    for path in _engine_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                assert node.value.value is not None, f"{path.name}:{node.lineno}: {ast.unparse(node)}"


def test_the_engine_checks_no_function_identity():
    assert _identity_checks() == set()
