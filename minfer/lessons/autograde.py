"""``minfer lessons grade``: grade submitted notebooks, one exercise per fresh process.

    minfer lessons grade alice.ipynb bob.ipynb ... [--csv scores.csv | --json scores.json]
                         [--timeout 60] [--jobs 2] [--lesson 04_paged_attention]

For each submission:

1. Find the lesson and its exercise cells. A cell tagged ``solution`` or
   ``exercise`` (or nbgrader's ``solution`` metadata) that defines an
   exercise's function (``Exercise.function``, from the registry) is that
   exercise's cell; failing that, the last code cell that defines it at top
   level. The lesson is the one with the most exercise cells found (or
   ``--lesson``); then only that lesson's exercises are looked for (an
   ordinary cell may share a name with another lesson's exercise: lesson
   09's ``tpot = ...``). Nothing else in the notebook runs: no model
   loading, no plots, and no edited or redefined ``check`` cell can change
   the verdict.
2. Grade each exercise of the lesson in its own ``python -m
   minfer.lessons.autograde --child`` process with a wall-clock timeout:
   the process runs ``Exercise.prelude`` (``import math, torch``), then the
   cell, then ``grader.grade`` with the very property the in-notebook
   ``check`` runs. A hung or crashing exercise fails alone; the others are
   still graded.
3. Before running anything, reject a cell that imports from ``minfer`` or
   reaches around the grader (``importlib``, ``__import__``, ``sys.modules``,
   ``setprofile``); while grading, reject a function that calls into minfer
   (``grader._call_watched``): "this calls the engine's own implementation".

Statuses: ``passed``, ``wrong``, ``raised``, ``not_implemented``, ``engine``
(rejected: uses minfer's implementation), ``forbidden`` (rejected by the
source check), ``missing`` (no cell defines the function), ``timeout``,
``crashed`` (the cell itself failed to run, or the process died), ``error``.

This is a grader, not a sandbox: the cells are the students' code and run
with your permissions. Grade untrusted submissions in a container.
"""
from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from minfer.cli_args import seconds
from minfer.lessons import exercises as _exercises
from minfer.lessons.exercises import Exercise
from minfer.lessons.grader import is_allowed

DEFAULT_TIMEOUT = 60.0     # seconds per exercise: the slowest property runs in a few
CELL_TAGS = ("solution", "exercise")
# Names in a solution that only serve to reach around the grader.
FORBIDDEN_NAMES = ("importlib", "__import__", "setprofile", "settrace", "_getframe")
FORBIDDEN_ATTRS = ("modules", "setprofile", "settrace", "_getframe", "f_back", "f_globals")


@dataclass
class ExerciseGrade:
    """One exercise of one submission: a row of the score table."""

    submission: str
    lesson: str
    exercise: str
    status: str
    points: int
    max_points: int
    message: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------------------
# Reading a submission
# ---------------------------------------------------------------------------


def _defined_names(source: str) -> Optional[set[str]]:
    """Top-level names a cell defines (def, class, assignment); None if it does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _is_exercise_cell(cell) -> bool:
    meta = cell.get("metadata", {})
    return (any(t in meta.get("tags", []) for t in CELL_TAGS)
            or bool(meta.get("nbgrader", {}).get("solution")))


def find_exercise_cells(nb, lesson: Optional[str] = None) -> dict[str, str]:
    """{exercise name: the source of the cell that defines its function}.

    With ``lesson`` (a notebook stem), only that lesson's exercises are looked
    for: another lesson's exercise may share a function name with an ordinary
    cell of this one (lesson 09's ``tpot = ...`` is not lesson 05's exercise).
    Without it, every lesson's (to guess the lesson of a submission).
    """
    code = [c for c in nb.cells if c.cell_type == "code"]
    found: dict[str, str] = {}
    for name in _exercises.names():
        if lesson is not None and _exercises.get(name).lesson != lesson:
            continue
        fn = _exercises.get(name).function
        if not fn:
            continue
        tagged = [c for c in code if _is_exercise_cell(c) and fn in (_defined_names(c.source) or ())]
        anywhere = [c for c in code if fn in (_defined_names(c.source) or ())]
        cells = tagged or anywhere
        if cells:
            found[name] = cells[-1].source
    return found


def lesson_exercises(lesson: str) -> list[Exercise]:
    """The registered exercises of ``lesson`` (a notebook stem), in registry order."""
    return [_exercises.get(n) for n in _exercises.names() if _exercises.get(n).lesson == lesson]


def lessons() -> list[str]:
    return sorted({_exercises.get(n).lesson for n in _exercises.names()} - {""})


def guess_lesson(path: Path, found: dict[str, str]) -> Optional[str]:
    """The lesson with the most exercise cells in ``found``; ties go to the file name."""
    def score(lesson: str) -> tuple[int, bool, bool]:
        n = sum(1 for ex in lesson_exercises(lesson) if ex.name in found)
        return n, lesson in path.name, lesson[:3] in path.name
    best = max(lessons(), key=score, default=None)
    return best if best is not None and score(best)[0] > 0 else None


def source_problem(exercise: Exercise, source: str) -> Optional[str]:
    """Why ``source`` may not be graded (an import from minfer, a reach around the
    grader), or None. Imports of the exercise's ``allowed`` helpers are fine."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return f"the cell is not valid Python: {e.msg} (line {e.lineno})"
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "minfer":
            if all(is_allowed(f"{node.module}:{a.name}", exercise.allowed) for a in node.names):
                continue
            return (f"line {line} imports from {node.module}: this calls the engine's own "
                    f"implementation; write the body yourself")
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "minfer" for a in node.names):
            return (f"line {line} imports minfer: this calls the engine's own implementation; "
                    f"write the body yourself")
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES \
                or isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRS:
            what = node.id if isinstance(node, ast.Name) else node.attr
            return f"line {line} uses {what!r}, which only serves to reach around the grader"
    return None


# ---------------------------------------------------------------------------
# Grading one exercise in a fresh process
# ---------------------------------------------------------------------------


def grade_source(exercise: Exercise, source: str) -> dict:
    """Run ``source`` (after the prelude) and grade the function it defines, in this process.

    Returns ``{"status", "message"}``. The child process runs this; tests call
    it directly to compare verdicts with ``check`` without a process each.
    """
    import linecache

    from minfer.lessons.grader import grade

    problem = source_problem(exercise, source)
    if problem is not None:
        return {"status": "forbidden", "message": f"rejected: {problem}"}
    filename = f"<cell defining {exercise.function}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict = {"__name__": "__submission__"}
    try:
        exec(compile(exercise.prelude, "<prelude>", "exec"), ns)
        exec(compile(source, filename, "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - the cell's failure is the verdict
        return {"status": "crashed", "message": f"the cell raised {type(e).__name__}: {e}"}
    fn = ns.get(exercise.function)
    if fn is None:
        return {"status": "missing", "message": f"the cell does not define {exercise.function}"}
    result = grade(exercise, fn, forbid_engine=True)
    return {"status": result.status, "message": result.message}


def _child() -> int:
    """``--child``: read {exercise, source} as JSON on stdin, print the verdict as JSON."""
    from contextlib import redirect_stdout

    import torch

    torch.set_num_threads(1)        # several graders share the cores (--jobs)
    job = json.load(sys.stdin)
    out = sys.stdout
    with redirect_stdout(sys.stderr):                  # the learner's prints stay off our JSON
        verdict = grade_source(_exercises.get(job["exercise"]), job["source"])
    json.dump(verdict, out)
    out.write("\n")
    return 0


def grade_exercise(exercise: Exercise, source: Optional[str], *, submission: str = "",
                   timeout: float = DEFAULT_TIMEOUT) -> ExerciseGrade:
    """Grade one exercise cell (``None``: no cell found) in a fresh process."""
    start = time.perf_counter()

    def row(status: str, message: str) -> ExerciseGrade:
        return ExerciseGrade(submission, exercise.lesson, exercise.name, status,
                             exercise.points if status == "passed" else 0, exercise.points,
                             message, round(time.perf_counter() - start, 2))

    if source is None:
        return row("missing", f"no code cell defines {exercise.function}")
    problem = source_problem(exercise, source)
    if problem is not None:
        return row("forbidden", f"rejected: {problem}")
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("MINFER_AUTOGRADE", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "minfer.lessons.autograde", "--child"],
            input=json.dumps({"exercise": exercise.name, "source": source}),
            capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return row("timeout", f"stopped after {timeout:g} s: an infinite loop, or far too slow")
    lines = proc.stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = proc.stderr.strip().splitlines()[-3:]
        return row("crashed", f"the grading process died (exit {proc.returncode}): "
                   + " | ".join(tail))
    return row(verdict["status"], verdict["message"])


def grade_submission(path: str | os.PathLike, *, lesson: Optional[str] = None,
                     timeout: float = DEFAULT_TIMEOUT, pool: Optional[ThreadPoolExecutor] = None
                     ) -> list:
    """Grade every exercise of one notebook; returns futures or rows (without ``pool``)."""
    import nbformat

    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 - an unreadable file is a row, not a crash
        return [ExerciseGrade(str(path), lesson or "?", "(notebook)", "error", 0, 0,
                              f"cannot read the notebook: {type(e).__name__}: {e}", 0.0)]
    lesson = lesson or guess_lesson(path, find_exercise_cells(nb))
    if lesson is None:
        return [ExerciseGrade(str(path), "?", "(notebook)", "missing", 0, 0,
                              "no exercise cell found: which lesson is this?", 0.0)]
    found = find_exercise_cells(nb, lesson)
    jobs = [(ex, found.get(ex.name)) for ex in lesson_exercises(lesson)]
    if pool is None:
        return [grade_exercise(ex, src, submission=str(path), timeout=timeout) for ex, src in jobs]
    return [pool.submit(grade_exercise, ex, src, submission=str(path), timeout=timeout)
            for ex, src in jobs]


def grade_many(paths: list, *, lesson: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
               jobs: int = 2) -> list[ExerciseGrade]:
    """Grade every submission, ``jobs`` exercise processes at a time; rows in input order."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending = [grade_submission(p, lesson=lesson, timeout=timeout, pool=pool) for p in paths]
        return [r.result() if hasattr(r, "result") else r for rows in pending for r in rows]


# ---------------------------------------------------------------------------
# The score table
# ---------------------------------------------------------------------------


def totals(rows: list[ExerciseGrade]) -> dict[str, tuple[int, int]]:
    """{submission: (points, max points)}, in order of first appearance."""
    out: dict[str, tuple[int, int]] = {}
    for r in rows:
        got, most = out.get(r.submission, (0, 0))
        out[r.submission] = (got + r.points, most + r.max_points)
    return out


def format_table(rows: list[ExerciseGrade]) -> str:
    """The score table for a terminal: one line per submission, then each finding."""
    lines = []
    for sub, (got, most) in totals(rows).items():
        mine = [r for r in rows if r.submission == sub]
        marks = " ".join(f"{r.exercise.split('.')[-1]}={'ok' if r.passed else r.status}"
                         for r in mine)
        lines.append(f"{got}/{most}  {sub}  [{mine[0].lesson}]  {marks}")
    lines.append("")
    for r in rows:
        if not r.passed:
            lines.append(f"--- {r.submission} :: {r.exercise} ({r.status})")
            lines.append(r.message)
    return "\n".join(lines).rstrip() + "\n"


def to_csv(rows: list[ExerciseGrade]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["submission", "lesson", "exercise", "status", "points", "max_points",
                     "seconds", "finding"])
    for r in rows:
        first = r.message.split("\n")[0]
        writer.writerow([r.submission, r.lesson, r.exercise, r.status, r.points,
                         r.max_points, r.seconds, first])
    return buf.getvalue()


def to_json(rows: list[ExerciseGrade]) -> dict:
    return {"totals": {s: {"points": g, "max_points": m} for s, (g, m) in totals(rows).items()},
            "exercises": [asdict(r) for r in rows]}


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("submissions", nargs="+", help="submitted notebooks (.ipynb)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", default=None, help="write the score table as CSV here")
    out.add_argument("--json", default=None, help="write the score table (and every finding) as JSON here")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT,
                   help=f"seconds per exercise before it is stopped (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--jobs", type=int, default=2, help="exercises graded at once (default 2)")
    p.add_argument("--lesson", default=None, help="the lesson (notebook stem) of every submission "
                   "(default: found from the exercise cells)")


def main(args) -> int:
    from minfer.atomic import write_json, write_text

    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.lesson is not None and args.lesson not in lessons():
        raise ValueError(f"--lesson {args.lesson!r} is not a lesson with exercises; "
                         f"choose one of {', '.join(lessons())}")
    missing = [s for s in args.submissions if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"no such submission: {', '.join(missing)}")
    rows = grade_many(args.submissions, lesson=args.lesson, timeout=args.timeout, jobs=args.jobs)
    sys.stdout.write(format_table(rows))
    if args.csv:
        write_text(args.csv, to_csv(rows))
        print(f"wrote {args.csv}")
    if args.json:
        write_json(args.json, to_json(rows))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        sys.exit(_child())
    parser = argparse.ArgumentParser(prog="python -m minfer.lessons.autograde")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
