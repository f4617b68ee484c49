"""Helpers that the lesson notebooks import: ``check("model.rms_norm", rms_norm)`` prints a report and
returns a ``CheckResult``; ``use`` / ``engine_args`` / ``compare_with_engine`` run the engine with a
learner's functions (``swap``, ``plug_ins``); ``autograde`` and ``notebooks`` serve the instructor
(docs/teaching.md)."""
from minfer.lessons import exercises
from minfer.lessons.exercises import Exercise, get, names, register
from minfer.lessons.grader import CheckResult, check, describe, grade, run
from minfer.lessons.swap import SWAP_POINTS, compare_with_engine, engine_args, use

__all__ = ["check", "grade", "run", "describe", "CheckResult", "Exercise", "exercises",
           "get", "names", "register", "use", "engine_args", "compare_with_engine", "SWAP_POINTS"]
