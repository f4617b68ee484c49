"""Helpers that the lesson notebooks import: the exercise grader and friends.

    from minfer.lessons import check
    check("model.rms_norm", rms_norm)      # prints a report, returns a CheckResult

- ``check(name, fn)``: grade a learner's function with the same hypothesis
  property that minfer's own tests run on the engine (``grader``).
- ``exercises``: the catalogue of every exercise, over the registry (``get``,
  ``names``, ``register``, ``Exercise``); its docstring says how to add one.
- ``use(rms_norm=fn, ...)``: run the engine with the learner's functions at
  the swap points declared in ``swap.SWAP_POINTS``; ``engine_args(schedule_step=fn)``
  builds an engine on those that plug into its constructor (``plug_ins``);
  ``compare_with_engine`` generates with both and prints whether the tokens are identical.
- ``autograde``: ``minfer lessons grade``, one fresh process per exercise.
- ``notebooks``: the student edition (solution cells replaced by stubs),
  notebook execution and report extraction, for the instructor and the tests.
  Imported on demand (``import minfer.lessons.notebooks``): it needs nbformat.
"""
from minfer.lessons import exercises
from minfer.lessons.exercises import Exercise, get, names, register
from minfer.lessons.grader import CheckResult, check, describe, grade, run
from minfer.lessons.swap import SWAP_POINTS, compare_with_engine, engine_args, use

__all__ = ["check", "grade", "run", "describe", "CheckResult", "Exercise", "exercises",
           "get", "names", "register", "use", "engine_args", "compare_with_engine", "SWAP_POINTS"]
