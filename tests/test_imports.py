"""The package's import graph has no cycles: no module imports a module that imports it back.

Every ``import`` counts, also those inside functions (a lazy import is still a
dependency a reader has to follow), and so does every package on the way:
importing ``minfer.a.b`` runs ``minfer/a/__init__.py`` first, so it is an edge
to ``minfer.a`` too (unless the importer lives in ``minfer.a`` itself, which
is then already running).
"""
from __future__ import annotations

import ast
from pathlib import Path

import minfer

ROOT = Path(minfer.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in files and t != mod}
        graph[mod] |= {p for t in graph[mod] for p in parents(t) if p in files and p not in parents(mod) | {mod}}
    return graph


def parents(module: str) -> set[str]:
    """The packages that Python initialises before ``module``: ``a.b.c`` -> {a, a.b}."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle (as a path that ends where it starts) or None: depth-first search, three colours."""
    state: dict[str, int] = {}          # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same edges between the packages (and top-level modules) of ``minfer``: ``minfer.a.b`` -> ``minfer.a``."""
    top = lambda m: ".".join(m.split(".")[:2])                       # noqa: E731
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
    return out


def test_no_import_cycles_between_packages():
    """``minfer.quant`` may import ``minfer.checkpoints`` or be imported by it, not both (through any module)."""
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_the_package_graph_merges_modules():
    graph = {"minfer.a.x": {"minfer.b.y"}, "minfer.b.y": {"minfer.c"}, "minfer.b.z": {"minfer.a.w"}}
    assert find_cycle(package_graph(graph)) == ["minfer.a", "minfer.b", "minfer.a"]


def test_an_import_reaches_the_packages_on_its_way():
    """``import minfer.kv.paged`` from outside ``minfer.kv`` is an edge to ``minfer.kv`` too."""
    graph = import_graph()
    assert "minfer.kv" in graph["minfer.engine.runner"]            # imports minfer.kv.block_pool
    assert "minfer.kv" not in graph["minfer.kv.paged"]             # already running: its own package
    assert parents("minfer.a.b") == {"minfer", "minfer.a"}


def test_only_bench_measures():
    """Benchmark code lives in ``minfer.bench``: the compression package imports none of it."""
    graph = import_graph()
    edges = [(m, n) for m, deps in graph.items() if m.startswith("minfer.compress")
             for n in deps if n.startswith("minfer.bench")]
    assert edges == [], edges
