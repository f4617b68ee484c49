"""Lesson notebooks: the student edition, execution, and reading grader reports.

An exercise is a ``solution``-tagged cell followed by a ``check(...)`` cell; no later cell may depend
on a learner's function. Conventions for authors: docs/teaching.md.
"""
import ast
import copy
import difflib
import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import nbformat

from minfer.atomic import atomic_write

SOLUTION_TAG = "solution"        # marks a solution cell in the reference edition
EXERCISE_TAG = "exercise"        # what the solution tag becomes in the student edition
LESSON_GLOB = "[0-9][0-9]_*.ipynb"
STUB_BODY = ("# YOUR CODE HERE", "raise NotImplementedError")
KERNEL_NAME = "python3"

# A report starts with a mark and ``check('name'):`` (see grader._result).
_REPORT_HEAD = re.compile(r"^\S*\s*check\('([^']+)'\): ", re.MULTILINE)


def make_stub(source: str) -> str:
    """The default stub of a solution cell: each top-level ``def`` (and method of a top-level ``class``)
    keeps its decorators, signature and docstring, its body becomes ``STUB_BODY``; the rest is verbatim.
    ``SyntaxError`` for a cell that is not valid Python (e.g. IPython magics)."""
    tree = ast.parse(source)
    functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append(node)
        elif isinstance(node, ast.ClassDef):
            functions += [n for n in node.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lines = source.splitlines(keepends=True)
    # Replace bodies from the bottom up so earlier line numbers stay valid.
    for fn in sorted(functions, key=lambda n: n.lineno, reverse=True):
        start = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
        first = fn.body[0]
        if first.lineno == fn.lineno:            # body on the def line: def f(x): return x
            def_line = lines[fn.lineno - 1].encode()[:first.col_offset].decode()
            header = lines[start - 1:fn.lineno - 1] + [def_line.rstrip() + "\n"]
            indent = " " * (fn.col_offset + 4)
        else:
            has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                       and isinstance(first.value.value, str))
            header = lines[start - 1:first.end_lineno if has_doc else first.lineno - 1]
            while header and (not header[-1].strip() or header[-1].strip().startswith("#")):
                header.pop()                     # comments between signature and body
            header[-1] = header[-1].rstrip("\n") + "\n"
            indent = " " * first.col_offset
        body = [f"{indent}{line}\n" for line in STUB_BODY]
        lines[start - 1:fn.end_lineno] = header + body
    return "".join(lines).rstrip("\n")


def is_solution(cell: nbformat.NotebookNode) -> bool:
    """Is ``cell`` a solution cell (a code cell tagged ``solution``)?"""
    return cell.cell_type == "code" and SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def student_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` with solution cells replaced by stubs and all outputs cleared."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if is_solution(cell):
            minfer_meta = cell.metadata.get("minfer", {})
            custom = minfer_meta.pop("stub", None)                  # the author's stub (str or lines)
            cell.source = make_stub(cell.source) if custom is None else "".join(custom)
            cell.metadata["tags"] = [EXERCISE_TAG if t == SOLUTION_TAG else t for t in cell.metadata["tags"]]
            if not minfer_meta:
                cell.metadata.pop("minfer", None)
    return out


def lesson_paths(folder: str | os.PathLike) -> list[Path]:
    """The lesson notebooks ``NN_*.ipynb`` in ``folder``, sorted."""
    return sorted(Path(folder).glob(LESSON_GLOB))


def make_student_edition(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         convert: Optional[Callable] = None) -> list[Path]:
    """Write the student edition (or ``convert``'s, e.g. ``nbgrader_notebook``) of every ``NN_*.ipynb``
    in ``src_dir`` into ``out_dir``, atomically; returns the paths. Refuses (``ValueError``) ``src_dir``
    itself and a folder that is not empty. Data files the lessons read are not copied."""
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if not src.is_dir():
        raise ValueError(f"src_dir {str(src_dir)!r} is not a folder")
    if out == src:
        raise ValueError(f"out_dir {str(out_dir)!r} is the source folder; the student "
                         f"edition would overwrite the solutions: choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{str(out_dir)!r} already exists and is not empty: writing there could "
                         f"overwrite a learner's notebooks; choose a new or empty folder")
    # Read and convert everything first: a bad notebook leaves nothing half-written.
    editions = []
    for path in lesson_paths(src):
        nb = nbformat.read(path, as_version=4)
        try:
            editions.append((path.name, (convert or student_notebook)(nb)))
        except SyntaxError as e:
            raise ValueError(f"{path.name}: a solution cell is not plain Python ({e.msg}, "
                             f"line {e.lineno}); give it an explicit "
                             f"metadata['minfer']['stub']") from None
    out.mkdir(parents=True, exist_ok=True)
    for name, nb in editions:
        nbformat.validate(nb)
        with atomic_write(out / name) as f:
            nbformat.write(nb, f)
    return [out / name for name, _ in editions]


def default_lessons_dir() -> Path:
    """``lessons/`` of this checkout if there is one, else ``./lessons``."""
    repo_lessons = Path(__file__).resolve().parents[2] / "lessons"
    return repo_lessons if repo_lessons.is_dir() else Path("lessons")


def student_edition_main(out_dir: str | os.PathLike, src_dir: Optional[str | os.PathLike] = None,
                         convert: Optional[Callable] = None, errors_raise: bool = False) -> int:
    """``minfer lessons student-edition OUT_DIR``: write the student edition; exit code."""
    src = Path(src_dir) if src_dir is not None else default_lessons_dir()
    try:
        written = make_student_edition(src, out_dir, convert)
    except (ValueError, OSError) as e:
        if errors_raise:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"no lessons ({LESSON_GLOB}) found in {src}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


# --- Executing notebooks and reading the reports ---
def ensure_kernel(kernel_name: str = KERNEL_NAME) -> str:
    """Make sure the ``python3`` kernel of *this* Python exists (else install it into ``sys.prefix``,
    as ``python -m ipykernel install --sys-prefix`` does); return its name."""
    from jupyter_client.kernelspec import KernelSpecManager

    if kernel_name in KernelSpecManager().find_kernel_specs():
        return kernel_name
    if kernel_name != KERNEL_NAME:
        raise ValueError(f"no Jupyter kernel named {kernel_name!r}")
    from ipykernel.kernelspec import install

    install(prefix=sys.prefix)
    return kernel_name


def execute_notebook(path: str | os.PathLike, timeout: int = 600,
                     cwd: Optional[str | os.PathLike] = None,
                     kernel_name: str = KERNEL_NAME,
                     extra_env: Optional[dict[str, str]] = None) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` top to bottom with nbclient; return it with its outputs (the file is
    not modified). The kernel starts in ``cwd`` (default: the notebook's folder) with this checkout on
    ``PYTHONPATH`` and ``extra_env``; ``timeout`` is per cell, in seconds; a cell that raises stops it."""
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=ensure_kernel(kernel_name),
        resources={"metadata": {"path": str(Path(cwd) if cwd is not None else path.parent)}},
    )
    root = str(Path(__file__).resolve().parents[2])          # the folder holding minfer/: importable
    pythonpath = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)
    client.execute(env={"PYDEVD_DISABLE_FILE_VALIDATION": "1",     # quiet a debugger warning
                        **os.environ, "PYTHONPATH": pythonpath, **(extra_env or {})})
    return nb


def grader_reports(nb: nbformat.NotebookNode) -> list[str]:
    """The reports printed by ``check(...)`` in an executed notebook, in order: each from its
    ``✅/❌ check('name'):`` line to the next report or the end of the cell's printed output."""
    reports = []
    for cell in nb.cells:                     # a markdown cell has no outputs
        text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream" and o.get("name") == "stdout")
        starts = [m.start() for m in _REPORT_HEAD.finditer(text)]
        for start, end in zip(starts, starts[1:] + [len(text)]):
            reports.append(text[start:end].rstrip())
    return reports


# --- Lessons committed with their outputs ---
HASH_KEY = "code_sha256"       # in nb.metadata["minfer"]: the code cells the outputs came from
FIGURE_DPI = 72                # PNG plots small enough to commit
SEED = "0"                     # PYTHONHASHSEED of the kernel: same hashes, same dict orders


def code_hash(nb: nbformat.NotebookNode) -> str:
    """sha256 of the code cells' sources, in order: what the stored outputs depend on (not markdown)."""
    code = b"".join(cell.source.encode() + b"\0" for cell in nb.cells if cell.cell_type == "code")
    return hashlib.sha256(code).hexdigest()


def stored_hash(nb: nbformat.NotebookNode) -> Optional[str]:
    return nb.metadata.get("minfer", {}).get(HASH_KEY)


def execute_and_store(path: str | os.PathLike, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute the lesson at ``path`` and write it back (atomically, only if every cell ran) with its
    outputs and code hash. Deterministic where it can be: ``PYTHONHASHSEED=0``, plots at ``FIGURE_DPI``,
    no execution timestamps; measured times still differ from run to run."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        rc = Path(tmp) / "matplotlibrc"
        rc.write_text(f"figure.dpi: {FIGURE_DPI}\nsavefig.dpi: {FIGURE_DPI}\n")
        extra = {"PYTHONHASHSEED": SEED, "MATPLOTLIBRC": str(rc)}
        nb = execute_notebook(path, timeout=timeout, extra_env=extra)
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata.setdefault("minfer", {})[HASH_KEY] = code_hash(nb)
    nbformat.validate(nb)
    with atomic_write(path) as f:
        nbformat.write(nb, f)
    return nb


def execute_main(paths: list[str], run_all: bool, timeout: int = 600) -> int:
    """``minfer lessons execute (--all | NOTEBOOK...)``: run lessons, store outputs; exit code."""
    targets = lesson_paths(default_lessons_dir()) if run_all else [Path(p) for p in paths]
    if not targets:
        raise ValueError("name the notebooks to execute, or --all for every lesson")
    missing = [str(p) for p in targets if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such notebook: {', '.join(missing)}")
    failed = []
    for path in targets:
        start = time.perf_counter()
        try:
            execute_and_store(path, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - one failing lesson must not stop the rest
            failed.append(path.name)
            print(f"FAILED {path}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}",
                  file=sys.stderr)
            continue
        print(f"executed {path} in {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1e3:.0f} kB", flush=True)
    if failed:
        print(f"{len(failed)} lesson(s) failed and were left unchanged: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


# --- The learner's copy and the nbgrader edition ---
def start_main(out_dir: str | os.PathLike) -> int:
    """``minfer lessons start DIR``: the student edition for a self-learner; exit code."""
    out = Path(out_dir)
    existing = [p.name for p in lesson_paths(out)] if out.is_dir() else []
    if existing:
        raise ValueError(f"{out} already holds lessons ({', '.join(existing[:3])}...): your work "
                         f"would be overwritten; choose an empty folder")
    code = student_edition_main(out)
    if code == 0:
        print(f"\nYour copy of the lessons is in {out}: open it with\n    jupyter lab {out}\n"
              f"Each exercise cell is a stub for you to fill in; the cell below it checks it.\n"
              f"The worked solutions (the 'book') stay in {default_lessons_dir()}.")
    return code


NBGRADER_SCHEMA = 3
_CHECK_CALL = re.compile(r"^(?:(\w+)\s*=\s*)?check\(\s*['\"]([\w.]+)['\"]", re.MULTILINE)


def nbgrader_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The lesson as an nbgrader *source* notebook: solution cells between ``### BEGIN/END SOLUTION``,
    check cells as locked graded test cells (``_hidden_test``). How: docs/teaching.md."""
    from minfer.lessons import exercises as _ex

    out = copy.deepcopy(nb)
    for i, cell in enumerate(out.cells):
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        meta = None
        if is_solution(cell):
            cell.source = _solution_regions(cell.source, make_stub(cell.source))
            cell.metadata["tags"] = [t for t in cell.metadata.get("tags", []) if t != SOLUTION_TAG]
            cell.metadata.pop("minfer", None)
            meta = {"grade": False, "solution": True, "locked": False, "grade_id": f"solution_{i}"}
        else:
            m = _CHECK_CALL.search(cell.source)
            if m is not None:
                name = m.group(2)
                cell.source = _hidden_test(cell.source, name)
                meta = {"grade": True, "solution": False, "locked": True,
                        "points": _ex.get(name).points,
                        "grade_id": "check_" + name.replace(".", "_")}
        if meta is not None:
            cell.metadata["nbgrader"] = {**meta, "schema_version": NBGRADER_SCHEMA}
    return out


def _hidden_test(source: str, name: str) -> str:
    """The check cell, then nbgrader's hidden test that decides the grade: it imports the grader's
    ``check`` under a private name, so a ``check`` the notebook defines is not the one it calls."""
    fn = next((ast.get_source_segment(source, node.args[1]) for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check"
               and len(node.args) >= 2 and getattr(node.args[0], "value", None) == name), None)
    if fn is None:
        raise ValueError(f"the check cell of {name!r} does not call check({name!r}, function)")
    return (source.rstrip("\n") + "\n### BEGIN HIDDEN TESTS\n"
            "from minfer.lessons.grader import check as _minfer_check   # the grader's own, now\n"
            f"assert _minfer_check({name!r}, {fn})\n### END HIDDEN TESTS")


def _solution_regions(source: str, stub: str) -> str:
    """Put each function body of ``source`` between nbgrader's solution markers; the stub
    (``make_stub``) shares every other line, so code outside functions stays outside them."""
    src, stub_lines = source.split("\n"), stub.split("\n")
    out: list[str] = []
    matcher = difflib.SequenceMatcher(a=stub_lines, b=src, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            out += src[b0:b1]
            continue
        body = src[b0:b1]
        if not body:
            continue
        indent = " " * min((len(ln) - len(ln.lstrip()) for ln in body if ln.strip()), default=4)
        out += [f"{indent}### BEGIN SOLUTION", *body, f"{indent}### END SOLUTION"]
    return "\n".join(out)


def nbgrader_edition_main(out_dir: str | os.PathLike, src_dir: Optional[str | os.PathLike] = None) -> int:
    """``minfer lessons student-edition OUT --nbgrader``: nbgrader source notebooks (errors raise)."""
    return student_edition_main(out_dir, src_dir, convert=nbgrader_notebook, errors_raise=True)
