"""``minfer lessons grade``: grade submitted notebooks, each exercise in two fresh processes: a grading
process (``--judge``) and the learner's (``minfer.lessons.isolate``), asked only for return values as
JSON data. The steps, the statuses and what limits do not stop: docs/teaching.md."""
import argparse
import ast
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import nbformat
import torch

from minfer.atomic import write_json, write_text
from minfer.cli_args import int_in, positive_int, seconds
from minfer.lessons import exercises as _exercises
from minfer.lessons.exercises import Exercise
from minfer.lessons.childproc import is_allowed
from minfer.lessons.grader import grade
from minfer.lessons.isolate import (DEFAULT_MEMORY_MB, Child, ChildGone, become_subreaper, bwrap,
                                    kill_descendants, remote)

DEFAULT_TIMEOUT = 60.0     # seconds per exercise: the slowest property runs in a few
JUDGE_MARGIN = 60.0        # the grading process's own start and reference time, on top


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


# --- Reading a submission ---
def _defined_names(source: str) -> Optional[set[str]]:
    """Top-level names a cell defines (def, class, assignment); None if it does not parse."""
    tree = _parse(source)[0]
    if tree is None:
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _parse(source: str) -> tuple[Optional[ast.Module], Optional[str]]:
    """(the cell's syntax tree, None), or (None, "<what> at line N: <the line>") for a cell that is not
    Python this grader can read (a syntax error, or nesting too deep for the parser's memory or stack)."""
    try:
        return ast.parse(source), None
    except SyntaxError as e:
        text = (e.text or "").strip()
        return None, f"{e.msg} at line {e.lineno}" + (f": {text[:120]}" if text else "")
    except (ValueError, MemoryError, RecursionError) as e:
        return None, f"the cell cannot be parsed ({type(e).__name__}: nested too deeply?)"


@dataclass
class FoundCell:
    """The cell that defines an exercise's function: the last one, as running the notebook
    top to bottom would leave it. ``problem``: why it is not valid Python, if it is not."""

    index: int
    source: str
    problem: Optional[str] = None


def locate(nb, function: str) -> Optional[FoundCell]:
    """The last code cell that defines ``function`` at top level (or, not parsing, looks as if
    it does: ``def function(``), or None."""
    looks_like = re.compile(rf"^\s*def\s+{re.escape(function)}\s*\(", re.MULTILINE)
    found = None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or function not in cell.source:
            continue
        names = _defined_names(cell.source)
        if names is not None and function in names:
            found = FoundCell(i, cell.source)
        elif names is None and looks_like.search(cell.source):
            found = FoundCell(i, cell.source, _parse(cell.source)[1])
    return found


def find_exercise_cells(nb, lesson: Optional[str] = None) -> dict[str, str]:
    """{exercise name: the source of the cell that defines its function} (``locate``), for ``lesson``'s
    exercises only (lesson 09's ``tpot = ...`` is not lesson 05's exercise); every lesson's without it."""
    return {name: cell.source for name, cell in exercise_cells(nb, lesson).items()}


def exercise_cells(nb, lesson: Optional[str] = None) -> dict[str, FoundCell]:
    """{exercise name: ``FoundCell``} for ``lesson``'s exercises (every lesson's without it)."""
    found = {ex.name: locate(nb, ex.function) for ex in map(_exercises.get, _exercises.names())
             if ex.function and lesson in (None, ex.lesson)}
    return {name: cell for name, cell in found.items() if cell is not None}


def _is_context(node: ast.stmt) -> bool:
    """An import, or a constant: an assignment to plain names that calls nothing."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return all(isinstance(t, ast.Name) for t in targets) and not any(
            isinstance(n, (ast.Call, ast.Lambda, ast.Await, ast.Yield, ast.comprehension))
            for n in ast.walk(node.value))
    return False


def notebook_context(nb, skip: Optional[int] = None) -> list[tuple[str, str]]:
    """The notebook's imports and constants, (label, source) in order: they run before the exercise's
    cell ``skip`` as in the notebook (one that fails there, an import of the engine, is skipped)."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or i == skip:
            continue
        tree = _parse(cell.source)[0]
        if tree is None:
            continue
        for node in tree.body:
            if _is_context(node):
                out.append((f"<cell {i}>", "\n" * (node.lineno - 1) + ast.get_source_segment(
                    cell.source, node)))
    return out


def lesson_exercises(lesson: str) -> list[Exercise]:
    """The registered exercises of ``lesson`` (a notebook stem), in registry order."""
    return [_exercises.get(n) for n in _exercises.names() if _exercises.get(n).lesson == lesson]


def lessons() -> list[str]:
    """The lessons (notebook stems) that have exercises."""
    return sorted({_exercises.get(n).lesson for n in _exercises.names()} - {""})


def guess_lesson(path: Path, found: dict[str, str]) -> Optional[str]:
    """The lesson with the most exercise cells in ``found``; ties go to the file name."""
    def score(lesson: str) -> tuple[int, bool, bool]:
        n = sum(1 for ex in lesson_exercises(lesson) if ex.name in found)
        return n, lesson in path.name, lesson[:3] in path.name
    best = max(lessons(), key=score, default=None)
    return best if best is not None and score(best)[0] > 0 else None


def source_problem(exercise: Exercise, source: str) -> Optional[str]:
    """Why ``source`` may not be graded (not Python; it imports minfer beyond the ``allowed`` helpers),
    or None. A courtesy for an honest mistake: minfer is not importable where the learner's code runs."""
    tree, problem = _parse(source)
    if tree is None:
        return f"the cell is not valid Python: {problem}"
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
    return None


# --- Grading one exercise in a fresh process ---
@dataclass(frozen=True)
class Limits:
    """What the learner's process may use (``isolate.Child``)."""

    timeout: float = DEFAULT_TIMEOUT          # wall-clock seconds per exercise (and CPU seconds)
    memory_mb: int = DEFAULT_MEMORY_MB        # RLIMIT_AS
    sandbox: bool = False                     # run it under bwrap
    hide: tuple[str, ...] = ()                # folders it must not read (the submissions')


def _before_running(exercise: Exercise, cell: Optional[FoundCell]) -> Optional[dict]:
    """The verdict when there is nothing to run: no cell, not Python, an import of the engine."""
    fn = exercise.function
    if cell is None:
        return {"status": "missing", "message": f"no code cell defines {fn}"}
    if cell.problem is not None:
        return {"status": "syntax", "message": f"the cell defining {fn} is not valid Python: "
                                                f"{cell.problem}"}
    problem = source_problem(exercise, cell.source)
    if problem is not None:
        return {"status": "forbidden", "message": f"rejected: {problem}"}
    return None


def judge(exercise: Exercise, cell: Optional[FoundCell], context: list, limits: Limits = Limits(),
          sweep_all: bool = False) -> dict:
    """Grade the function ``cell`` defines: ``{"status", "message"}``, computed here (the grading process
    holds the reference); the learner's cells run in a ``Child`` that only answers with return values."""
    fn = exercise.function
    early = _before_running(exercise, cell)
    if early is not None:
        return early
    job = {"prelude": exercise.prelude, "context": [list(c) for c in context],
           "cell": [f"<cell {cell.index}>", cell.source], "function": fn, "allowed": list(exercise.allowed)}
    child = None
    try:
        child = Child(job, timeout=limits.timeout, memory_mb=limits.memory_mb,
                      sandbox=limits.sandbox, hide=list(limits.hide), sweep_all=sweep_all)
        ready = child.ready
        if "crashed" in ready or "missing" in ready:
            status = "crashed" if "crashed" in ready else "missing"
            return {"status": status, "message": str(ready[status])[:2000]}
        if ready != {"ready": True}:
            raise ChildGone("crashed", "the learner's process broke the protocol")
        result = grade(exercise, remote(child, fn))
        return {"status": result.status, "message": result.message}
    except ChildGone as e:
        return {"status": e.status, "message": e.message}
    finally:
        if child is not None:
            child.close()


def grade_source(exercise: Exercise, source: str, context: list = ()) -> dict:
    """``judge`` on one cell's source, in this process (tests compare it with ``check``)."""
    return judge(exercise, FoundCell(0, source, _parse(source)[1]), list(context))


def _judge_main() -> int:
    """``--judge``: read {tasks, limits} as JSON on stdin; print one verdict per task, one JSON
    line each, as soon as it is known (a learner who kills this process loses only the rest)."""
    torch.set_num_threads(1)        # several graders share the cores (--jobs)
    become_subreaper()              # a learner's grandchild that calls setsid comes back here
    job = json.load(sys.stdin)
    limits = Limits(**{**job["limits"], "hide": tuple(job["limits"]["hide"])})
    for task in job["tasks"]:
        start = time.perf_counter()
        cell = FoundCell(**task["cell"]) if task["cell"] is not None else None
        verdict = judge(_exercises.get(task["exercise"]), cell, task["context"], limits,
                        sweep_all=True)
        verdict["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(verdict), flush=True)
    return 0


def _run_judge(tasks: list[dict], limits: Limits) -> list[Optional[dict]]:
    """Run ``tasks`` in one fresh grading process; a verdict per task (None: it never came)."""
    job = {"tasks": tasks, "limits": asdict(limits)}
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("MINFER_AUTOGRADE", None)
    proc = subprocess.Popen([sys.executable, "-m", "minfer.lessons.autograde", "--judge"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    lost = {"status": "crashed", "message": "the grading process was killed (by the cell?)"}
    try:
        out, _ = proc.communicate(json.dumps(job),
                                  timeout=len(tasks) * (2 * limits.timeout) + JUDGE_MARGIN)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        lost = None
    verdicts: list[Optional[dict]] = []
    for line in out.splitlines():
        with suppress(ValueError):              # a line that is not a verdict
            verdicts.append(json.loads(line))
    return (verdicts + [lost] * len(tasks))[:len(tasks)]


def _row(exercise: Exercise, submission: str, verdict: Optional[dict], limits: Limits) -> ExerciseGrade:
    if verdict is None:
        verdict = {"status": "timeout", "message": f"stopped: the grading process ran out of time "
                                                   f"(--timeout {limits.timeout:g})"}
    status = verdict["status"]
    return ExerciseGrade(submission, exercise.lesson, exercise.name, status,
                         exercise.points if status == "passed" else 0, exercise.points,
                         verdict["message"], verdict.get("seconds", 0.0))


def grade_cells(jobs: list[tuple[Exercise, Optional[FoundCell], list]], *, submission: str = "",
                limits: Limits = Limits()) -> list[ExerciseGrade]:
    """Grade one submission's exercises: those with nothing to run here, the rest in one fresh
    grading process (each exercise in its own learner's process)."""
    early = {ex.name: _before_running(ex, cell) for ex, cell, _ in jobs}
    tasks = [{"exercise": ex.name, "cell": asdict(cell), "context": [list(c) for c in ctx]}
             for ex, cell, ctx in jobs if early[ex.name] is None]
    verdicts = iter(_run_judge(tasks, limits) if tasks else [])
    return [_row(ex, submission, early[ex.name] or next(verdicts), limits) for ex, _, _ in jobs]


def grade_exercise(exercise: Exercise, cell, *, context: list = (), submission: str = "",
                   limits: Optional[Limits] = None, timeout: Optional[float] = None) -> ExerciseGrade:
    """Grade one exercise (``cell``: a ``FoundCell``, a source string, or None: no cell found)
    in a fresh grading process, which starts the learner's process."""
    limits = limits or Limits(timeout=timeout or DEFAULT_TIMEOUT)
    if isinstance(cell, str):
        cell = FoundCell(0, cell, _parse(cell)[1])
    return grade_cells([(exercise, cell, list(context))], submission=submission, limits=limits)[0]


def grade_submission(path: str | os.PathLike, *, lesson: Optional[str] = None,
                     limits: Limits = Limits()) -> list[ExerciseGrade]:
    """Grade every exercise of one notebook, in one grading process (an unreadable notebook: one
    "error" row naming it; the class goes on)."""
    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
        lesson = lesson or guess_lesson(path, find_exercise_cells(nb))
        if lesson is None:
            return [ExerciseGrade(str(path), "?", "(notebook)", "missing", 0, 0,
                                  "no exercise cell found: which lesson is this?", 0.0)]
        found = exercise_cells(nb, lesson)
        jobs = [(ex, found.get(ex.name),
                 notebook_context(nb, skip=found[ex.name].index) if ex.name in found else [])
                for ex in lesson_exercises(lesson)]
    except Exception as e:  # noqa: BLE001 - an unreadable file is a row, not a crash
        return [ExerciseGrade(str(path), lesson or "?", "(notebook)", "error", 0, 0,
                              f"cannot read the notebook: {type(e).__name__}: {str(e)[:300]}", 0.0)]
    return grade_cells(jobs, submission=str(path), limits=limits)


def grade_many(paths: list, *, lesson: Optional[str] = None, limits: Limits = Limits(),
               jobs: int = 2) -> list[ExerciseGrade]:
    """Grade every submission, ``jobs`` submissions at a time; rows in input order."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending = [pool.submit(grade_submission, p, lesson=lesson, limits=limits) for p in paths]
        return [r for f in pending for r in f.result()]


# --- The score table ---
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
            lines += [f"--- {r.submission} :: {r.exercise} ({r.status})", r.message]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(rows: list[ExerciseGrade]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["submission", "lesson", "exercise", "status", "points", "max_points", "seconds",
                     "finding"])
    writer.writerows([r.submission, r.lesson, r.exercise, r.status, r.points, r.max_points, r.seconds,
                      r.message.split("\n")[0]] for r in rows)
    return buf.getvalue()


def to_json(rows: list[ExerciseGrade]) -> dict:
    return {"totals": {s: {"points": g, "max_points": m} for s, (g, m) in totals(rows).items()},
            "exercises": [asdict(r) for r in rows]}


# --- The command ---
def _timeout(text: str) -> float:
    """``--timeout``: ``cli_args.seconds``, at most a day (the limits it sets must not overflow)."""
    if seconds(text) > 86400:
        raise argparse.ArgumentTypeError(f"must be at most 86400 seconds, got {text[:40]!r}")
    return seconds(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("submissions", nargs="+", help="submitted notebooks (.ipynb)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", default=None, help="write the score table as CSV here")
    out.add_argument("--json", default=None, help="write the score table (and every finding) as JSON here")
    p.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT,
                   help=f"seconds per exercise before it is stopped, wall clock and CPU "
                        f"(default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--memory", type=positive_int, default=DEFAULT_MEMORY_MB,
                   help=f"MiB of address space per exercise (RLIMIT_AS; default {DEFAULT_MEMORY_MB})")
    p.add_argument("--sandbox", action="store_true",
                   help="run each submission under bwrap: read-only root, no network, only a "
                        "scratch folder writable, the submissions' folders hidden")
    p.add_argument("--jobs", type=int_in(1, 256), default=2,
                   help="submissions graded at once (default 2)")
    p.add_argument("--lesson", default=None, help="the lesson (notebook stem) of every submission "
                   "(default: found from the exercise cells)")


def main(args) -> int:
    if args.lesson is not None and args.lesson not in lessons():
        raise ValueError(f"--lesson {args.lesson!r} is not a lesson with exercises; "
                         f"choose one of {', '.join(lessons())}")
    if args.sandbox:
        bwrap()                     # ValueError where bwrap is not installed
    missing = [s for s in args.submissions if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"no such submission: {', '.join(missing)}")
    hide = {str(Path(s).resolve().parent) for s in args.submissions} | {os.getcwd()}
    hide |= {os.path.expanduser("~")}
    limits = Limits(timeout=args.timeout, memory_mb=args.memory, sandbox=args.sandbox,
                    hide=tuple(sorted(hide)))
    become_subreaper()
    try:
        rows = grade_many(args.submissions, lesson=args.lesson, limits=limits, jobs=args.jobs)
    finally:
        kill_descendants()          # anything a killed grading process left behind
    sys.stdout.write(format_table(rows))
    if args.csv:
        write_text(args.csv, to_csv(rows))
        print(f"wrote {args.csv}")
    if args.json:
        write_json(args.json, to_json(rows))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--judge"]:
        sys.exit(_judge_main())
    parser = argparse.ArgumentParser(prog="python -m minfer.lessons.autograde")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
