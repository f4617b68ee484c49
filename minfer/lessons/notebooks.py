"""Lesson notebooks: the student edition, execution, and reading grader reports.

Cell conventions for a lesson author
------------------------------------
An exercise is two code cells:

1. the *solution cell*, tagged ``solution`` (cell metadata ``"tags":
   ["solution"]``), defining the function the learner writes::

       def rms_norm(x, weight, eps):
           \"\"\"x * rsqrt(mean(x^2) + eps) * weight over the last dim.\"\"\"
           xf = x.float()
           return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight

2. the *check cell* right below it, which only calls the grader::

       check("model.rms_norm", rms_norm)

In the student edition every solution cell becomes a stub. By default the
stub keeps each top-level function's (and each top-level class method's)
decorators, signature and docstring, and replaces the body with
``# YOUR CODE HERE`` / ``raise NotImplementedError``; other statements in the
cell (imports, constants) stay as they are. To hand out something else, put
the exact stub source in the cell's metadata: ``metadata["minfer"]["stub"]``.

The rule that keeps the student edition running: **no later cell may depend
on a learner's function.** A stub raises ``NotImplementedError``; ``check``
reports that and does not raise, so the notebook runs to the end, but any
other cell calling the stub would stop it. Cells after an exercise use the
engine's implementation (``from minfer.model import rms_norm``), never the
learner's. The test suite executes both editions to hold lessons to this.

Lesson files are ``lessons/NN_topic.ipynb`` (two digits, underscore).
"""
from __future__ import annotations

import ast
import copy
import os
import re
import sys
from pathlib import Path
from typing import Optional

import nbformat

from minfer.atomic import atomic_write

SOLUTION_TAG = "solution"        # marks a solution cell in the reference edition
EXERCISE_TAG = "exercise"        # what the solution tag becomes in the student edition
LESSON_GLOB = "[0-9][0-9]_*.ipynb"
STUB_BODY = ("# YOUR CODE HERE", "raise NotImplementedError")
KERNEL_NAME = "python3"

# A report starts with a mark and ``check('name'):`` (see grader._result).
_REPORT_HEAD = re.compile(r"^\S*\s*check\('([^']+)'\): ", re.MULTILINE)


# ---------------------------------------------------------------------------
# Stubs and the student edition
# ---------------------------------------------------------------------------


def make_stub(source: str) -> str:
    """The default stub of a solution cell's source.

    Each top-level ``def`` (and each method of a top-level ``class``) keeps its
    decorators, signature and docstring; its body becomes ``STUB_BODY``.
    Everything else is kept verbatim. Raises ``SyntaxError`` for a cell
    that is not valid Python (e.g. one using IPython magics).
    """
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


def stub_for(cell: nbformat.NotebookNode) -> str:
    """The source a student sees for a solution cell: the author's stub, or ``make_stub``."""
    custom = cell.get("metadata", {}).get("minfer", {}).get("stub")
    if custom is not None:
        return custom if isinstance(custom, str) else "".join(custom)
    return make_stub(cell.source)


def student_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` with solution cells replaced by stubs and all outputs cleared."""
    out = copy.deepcopy(nb)
    for cell in out.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        if is_solution(cell):
            cell.source = stub_for(cell)
            tags = cell.metadata.get("tags", [])
            cell.metadata["tags"] = [EXERCISE_TAG if t == SOLUTION_TAG else t for t in tags]
            minfer_meta = cell.metadata.get("minfer", {})
            minfer_meta.pop("stub", None)
            if not minfer_meta:
                cell.metadata.pop("minfer", None)
    return out


def lesson_paths(folder: str | os.PathLike) -> list[Path]:
    """The lesson notebooks ``NN_*.ipynb`` in ``folder``, sorted."""
    return sorted(Path(folder).glob(LESSON_GLOB))


def _write_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` to ``path`` atomically (``minfer.atomic``)."""
    with atomic_write(path) as f:
        nbformat.write(nb, f)


def make_student_edition(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the student edition of every ``NN_*.ipynb`` in ``src_dir`` into ``out_dir``.

    Solution cells become stubs, every output is cleared. Each file is written
    atomically. Refuses (``ValueError``) to write into ``src_dir`` itself, so
    the reference edition cannot be overwritten. Only the notebooks are
    written: copy any data files the lessons read yourself. Returns the
    written paths.
    """
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if not src.is_dir():
        raise ValueError(f"src_dir {str(src_dir)!r} is not a folder")
    if out == src:
        raise ValueError(f"out_dir {str(out_dir)!r} is the source folder; the student "
                         f"edition would overwrite the solutions: choose another folder")
    sources = lesson_paths(src)
    # Read and convert everything first: a bad notebook leaves nothing half-written.
    editions = []
    for path in sources:
        nb = nbformat.read(path, as_version=4)
        try:
            editions.append((path.name, student_notebook(nb)))
        except SyntaxError as e:
            raise ValueError(f"{path.name}: a solution cell is not plain Python ({e.msg}, "
                             f"line {e.lineno}); give it an explicit "
                             f"metadata['minfer']['stub']") from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, nb in editions:
        nbformat.validate(nb)
        _write_atomic(nb, out / name)
        written.append(out / name)
    return written


def default_lessons_dir() -> Path:
    """``lessons/`` of this checkout if there is one, else ``./lessons``."""
    repo_lessons = Path(__file__).resolve().parents[2] / "lessons"
    return repo_lessons if repo_lessons.is_dir() else Path("lessons")


def student_edition_main(out_dir: str | os.PathLike,
                         src_dir: Optional[str | os.PathLike] = None) -> int:
    """``minfer lessons student-edition OUT_DIR``: write the student edition; exit code."""
    src = Path(src_dir) if src_dir is not None else default_lessons_dir()
    try:
        written = make_student_edition(src, out_dir)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"no lessons ({LESSON_GLOB}) found in {src}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------
# Executing notebooks and reading the reports
# ---------------------------------------------------------------------------


def ensure_kernel(kernel_name: str = KERNEL_NAME) -> str:
    """Make sure the ``python3`` kernel of *this* Python exists; return its name.

    ``pip install ipykernel`` puts the spec in ``<venv>/share/jupyter/kernels``
    and jupyter prefers it inside a virtual environment; jupyter_client also
    runs the ``python3`` kernel with ``sys.executable``. If no spec is found
    (an unusual install), it is installed into ``sys.prefix``, the equivalent
    of ``python -m ipykernel install --sys-prefix``.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    if kernel_name in KernelSpecManager().find_kernel_specs():
        return kernel_name
    if kernel_name != KERNEL_NAME:
        raise ValueError(f"no Jupyter kernel named {kernel_name!r}")
    from ipykernel.kernelspec import install

    install(prefix=sys.prefix)
    return kernel_name


def _kernel_env() -> dict[str, str]:
    """The environment for the kernel: this one, with this checkout of minfer importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])          # the folder holding minfer/
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")   # quiet a debugger warning
    return env


def execute_notebook(path: str | os.PathLike, timeout: int = 600,
                     cwd: Optional[str | os.PathLike] = None,
                     kernel_name: str = KERNEL_NAME) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` top to bottom; return it with its outputs.

    Uses nbclient and the ``python3`` kernel of the running Python, started in
    ``cwd`` (default: the notebook's folder) with this checkout of minfer on
    ``PYTHONPATH``. ``timeout`` is per cell, in seconds. A cell that raises
    stops the run with ``nbclient.exceptions.CellExecutionError``, whose
    message holds the cell's traceback. The file itself is not modified.
    """
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=ensure_kernel(kernel_name),
        resources={"metadata": {"path": str(Path(cwd) if cwd is not None else path.parent)}},
    )
    client.execute(env=_kernel_env())
    return nb


def grader_reports(nb: nbformat.NotebookNode) -> list[str]:
    """The reports printed by ``check(...)`` in an executed notebook, in order.

    A report runs from its ``✅/❌ check('name'):`` line to the next report or
    the end of the cell's printed output.
    """
    reports = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream" and o.get("name") == "stdout")
        starts = [m.start() for m in _REPORT_HEAD.finditer(text)]
        for start, end in zip(starts, starts[1:] + [len(text)]):
            reports.append(text[start:end].rstrip())
    return reports

