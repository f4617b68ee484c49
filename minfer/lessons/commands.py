"""``minfer lessons start | student-edition | grade | execute``, wired into ``minfer.cli``, and the
``--use-solutions`` flag of ``minfer generate`` (``with_solutions``)."""
import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minfer.cli_args import positive_int


def add_lessons_commands(p: argparse.ArgumentParser) -> None:
    """Add the ``lessons`` subcommands to the ``lessons`` parser ``p``."""
    from minfer.lessons import autograde, notebooks

    sub = p.add_subparsers(dest="lessons_cmd", required=True)
    s = sub.add_parser("start", help="write your own copy of the lessons, exercises as stubs")
    s.add_argument("out_dir")
    s.set_defaults(func=lambda args: notebooks.start_main(args.out_dir))

    s = sub.add_parser("student-edition", help="write the notebooks with solution cells emptied")
    s.add_argument("out_dir")
    s.add_argument("--nbgrader", action="store_true",
                   help="write nbgrader source notebooks (solution regions, locked graded check cells)")
    s.set_defaults(func=lambda args: (notebooks.nbgrader_edition_main if args.nbgrader
                                      else notebooks.student_edition_main)(args.out_dir))

    s = sub.add_parser("grade", help="grade submitted notebooks: one score table")
    autograde.add_arguments(s)
    s.set_defaults(func=autograde.main)

    s = sub.add_parser("execute", help="execute lessons and store their outputs and code hash")
    s.add_argument("notebooks", nargs="*", help="notebooks to execute")
    s.add_argument("--all", action="store_true", help="every lessons/NN_*.ipynb")
    s.add_argument("--timeout", type=positive_int, default=600, help="seconds per cell (default 600)")
    s.set_defaults(func=_execute)


def _execute(args) -> int:
    from minfer.lessons.notebooks import execute_main
    if args.all and args.notebooks:
        raise ValueError("give --all or notebook paths, not both")
    return execute_main(args.notebooks, args.all, timeout=args.timeout)


def load_solutions(notebook: str) -> dict:
    """``--use-solutions``: ``{swap point: function}`` for the written (not stub) functions of ``notebook``,
    each graded first. The notebook is the learner's own: its exercise cells run in this process."""
    import nbformat

    from minfer.lessons import exercises
    from minfer.lessons.autograde import find_exercise_cells
    from minfer.lessons.grader import grade
    from minfer.lessons.swap import SWAP_POINTS

    if not Path(notebook).is_file():
        raise FileNotFoundError(f"--use-solutions: no such notebook: {notebook}")
    found = find_exercise_cells(nbformat.read(notebook, as_version=4))
    chosen = {}
    for point in SWAP_POINTS.values():
        if point.exercise is None or point.exercise not in found:
            continue
        ex = exercises.get(point.exercise)
        ns: dict = {"__name__": "__solution__"}
        exec(compile(ex.prelude, "<prelude>", "exec"), ns)
        exec(compile(found[point.exercise], f"<{notebook}: {ex.function}>", "exec"), ns)
        result = grade(ex, ns[ex.function], forbid_engine=True)
        print(result.message.split("\n")[0], file=sys.stderr)
        if result.status == "not_implemented":
            continue
        if not result.passed:
            print(f"[using your {ex.function} anyway: expect the output to differ]", file=sys.stderr)
        chosen[point.name] = ns[ex.function]
    if not chosen:
        raise ValueError(f"--use-solutions: {notebook} has no written function the engine can run "
                         f"(swap points: {', '.join(SWAP_POINTS)})")
    print(f"[running the engine with your {', '.join(chosen)}]", file=sys.stderr)
    return chosen


@contextmanager
def with_solutions(llm, notebook: str) -> Iterator:
    """``--use-solutions``: the LLM to generate with, running the notebook's functions (``use`` for
    module swap points; a second engine on ``llm``'s model for constructor ones, ``plug_ins.rebuild``)."""
    from minfer.lessons.plug_ins import rebuild
    from minfer.lessons.swap import split, use

    swapped, built = split(load_solutions(notebook))
    with use(**swapped):
        yield rebuild(llm, **built) if built else llm
