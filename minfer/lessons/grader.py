"""The grader: ``check(name, fn)`` runs an exercise's property on a learner's function.

Hypothesis draws inputs, compares the learner's output with the reference's and shrinks a failure to
the smallest example: one printed block, never a stack trace. Example reports: docs/teaching.md.
"""
import copy
import os
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Flaky

from minfer.lessons import exercises as _exercises
from minfer.lessons.childproc import call_watched, is_allowed  # noqa: F401  (is_allowed: re-exported)
from minfer.lessons.exercises import Exercise, Inputs
from minfer.lessons.isolate import EngineCalled, LearnerRaised

# Report headers look like ``✅ check('name'): ...``; ``notebooks.grader_reports``
# finds reports by the ``check('name'):`` part.
PASS_MARK, FAIL_MARK = "✅", "❌"


@dataclass
class CheckResult:
    """The outcome of ``check``, truthy when it passed. ``status``: "passed", "wrong", "raised",
    "not_implemented" (a stub), "engine" (it calls minfer's own implementation) or "error" (the grader
    could not grade: a missing or broken reference, not a function, different answers to the same inputs).
    """

    name: str
    passed: bool
    status: str
    message: str = field(repr=False)                                    # the printed report
    counterexample: Optional[Inputs] = field(default=None, repr=False)  # the shrunk failing inputs, if any
    expected: Any = field(default=None, repr=False)                     # the reference's output on them
    actual: Any = field(default=None, repr=False)                       # the learner's output on them
    examples: int = field(default=0, repr=False)                        # how many examples were run

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:
        """Show nothing in a notebook: ``check`` has already printed the report."""


class _Failure(Exception):
    """One failing example: its ``status`` ("wrong", "raised", "not_implemented", "engine" or
    "reference": the reference raised), its inputs, and what went wrong."""

    def __init__(self, status: str, inputs: Inputs, error: Optional[Exception] = None, callee: str = "",
                 expected: Any = None, actual: Any = None, problem: str = ""):
        super().__init__(status)
        self.status, self.inputs, self.error, self.callee = status, inputs, error, callee
        self.expected, self.actual, self.problem = expected, actual, problem


def _copy(inputs: Inputs) -> Inputs:
    """Fresh copies of tensor, list and dict inputs, so an in-place edit cannot leak between calls."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) if isinstance(v, (list, dict)) else v
            for k, v in inputs.items()}


def _one_example(exercise: Exercise, fn: Callable, reference: Callable, inputs: Inputs,
                 forbid_engine: bool = False) -> None:
    """The property for one example: raise a ``_Failure`` unless ``fn`` is right."""
    try:
        expected = reference(*_copy(inputs).values())
    except Exception as e:  # noqa: BLE001 - reported, not raised
        raise _Failure("reference", inputs, error=e) from None
    try:
        args = list(_copy(inputs).values())
        actual, callee = call_watched(fn, args, exercise.allowed) if forbid_engine else (fn(*args), None)
    except NotImplementedError as e:
        raise _Failure("not_implemented", inputs, error=e) from None
    except EngineCalled as e:            # seen by the learner's process (``isolate``)
        raise _Failure("engine", inputs, callee=e.callee) from None
    except Exception as e:  # noqa: BLE001 - the learner's bug: reported, not raised
        raise _Failure("raised", inputs, error=e) from None
    if callee is not None:
        raise _Failure("engine", inputs, callee=callee)
    problem = exercise.compare(inputs, expected, actual)
    if problem is None and exercise.validate is not None and (why := exercise.validate(inputs, actual)):
        problem = f"disagrees with the definition: {why}"
    if problem is not None:
        raise _Failure("wrong", inputs, expected=expected, actual=actual, problem=problem)


# --- Running the property ---
# The same examples every run (the same report), no .hypothesis/ folder next to the notebook, no deadline
# (a slow laptop is not a failure), one failure reported: the smallest.
_SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False, verbosity=Verbosity.quiet,
                 report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
                 phases=[Phase.explicit, Phase.generate, Phase.shrink])


def grade(exercise: Exercise, fn: Callable, *, max_examples: Optional[int] = None,
          reference: Optional[Callable] = None, forbid_engine: bool = False) -> CheckResult:
    """Run ``exercise``'s property on ``fn``; print nothing, never raise for what ``fn`` does.
    ``reference`` replaces the exercise's (to test the grader itself); ``forbid_engine`` rejects a
    function that calls into minfer beyond ``exercise.allowed``."""
    name = exercise.name
    fn_name = getattr(fn, "__name__", None) or repr(fn)
    if not callable(fn):
        return _result(name, "error", f"expected a function, got {type(fn).__name__} {fn!r}")
    if reference is None:
        try:
            reference = exercise.load_reference()
        except Exception as e:  # noqa: BLE001
            return _result(name, "error", f"could not import the reference "
                           f"{exercise.reference.replace(':', '.')}: {type(e).__name__}: {e}")
    ref_name = getattr(reference, "__module__", "?") + "." + getattr(reference, "__name__", "?")

    runs = 0

    @settings(max_examples=max_examples or exercise.max_examples, **_SETTINGS)
    @given(exercise.inputs)
    def prop(inputs: Inputs) -> None:
        nonlocal runs
        runs += 1
        _one_example(exercise, fn, reference, inputs, forbid_engine)

    try:
        prop()
    except _Failure as f:
        status = "error" if f.status == "reference" else f.status
        return _result(name, status, _failure_text(f, fn_name, ref_name), failure=f, examples=runs)
    except Flaky:
        return _result(name, "error",
                       f"{fn_name} gave different results for the same inputs: is it random, "
                       f"or does it keep state between calls?", examples=runs)
    except Exception as e:  # noqa: BLE001 - the grader must never raise at the learner
        return _result(name, "error", f"the grader failed: {_one_line(e)}", examples=runs)
    return _result(name, "passed",
                   f"{fn_name} agrees with minfer's implementation on {runs} random examples",
                   examples=runs)


def run(exercise: Exercise, fn: Callable, *, max_examples: Optional[int] = None,
        reference: Optional[Callable] = None) -> None:
    """Run the property on ``fn``; ``AssertionError`` with the report if it fails: the form for ``tests/``,
    where the engine passes the very property the learner is graded by."""
    result = grade(exercise, fn, max_examples=max_examples, reference=reference)
    if not result.passed:
        raise AssertionError(result.message)


def check(name: str, fn: Callable, max_examples: Optional[int] = None) -> CheckResult:
    """Grade the learner's ``fn`` on exercise ``name``; print the report, return the result (truthy if
    passed). Raises only for an unknown ``name`` (ValueError) or a failure under ``MINFER_AUTOGRADE=1``."""
    exercise = _exercises.get(name)
    result = grade(exercise, fn, max_examples=max_examples, forbid_engine=True)
    _print(result.message)
    if not result.passed and os.environ.get("MINFER_AUTOGRADE", "") not in ("", "0"):
        raise AssertionError(result.message)
    return result


def describe() -> str:
    """A list of the registered exercises, one per line."""
    return "\n".join(f"{n}: {_exercises.get(n).description}" for n in _exercises.names())


# --- Formatting the report ---
def _result(name: str, status: str, text: str, failure: Optional[_Failure] = None,
            examples: int = 0) -> CheckResult:
    passed = status == "passed"
    head = f"{PASS_MARK if passed else FAIL_MARK} check({name!r}): "
    head += f"passed: {text}" if passed else text
    return CheckResult(name=name, passed=passed, status=status, message=head, examples=examples,
                       counterexample=getattr(failure, "inputs", None),
                       expected=getattr(failure, "expected", None), actual=getattr(failure, "actual", None))


def _failure_text(f: _Failure, fn_name: str, ref_name: str) -> str:
    """The report on the smallest failing example hypothesis found."""
    if f.status == "wrong":
        return "\n".join([
            f"wrong answer from {fn_name}",
            "smallest failing example hypothesis found:",
            _format_inputs(f.inputs),
            _labelled("expected (minfer):", f.expected),
            _labelled("yours:            ", f.actual),
            f"what is wrong: {f.problem}",
        ])
    if f.status == "engine":
        return (f"rejected: {fn_name} calls the engine's own implementation "
                f"({f.callee.replace(':', '.')}); write the body yourself")
    if f.status == "reference":
        return (f"could not grade: minfer's reference {ref_name} raised {_one_line(f.error)}\non:\n"
                f"{_format_inputs(f.inputs)}\n(a bug in minfer, not in your code)")
    where = _user_frame(f.error)
    if f.status == "not_implemented":
        stub = where.name if where is not None and where.name != "<module>" else fn_name
        return (f"not implemented yet: write the body of {stub} in the cell above "
                f"(it still raises NotImplementedError)")
    at = f" at line {where.lineno} of {where.name}: {where.line}" if where and where.line else ""
    return (f"{fn_name} raised {_one_line(f.error)}{at}\n"
            f"on the smallest input hypothesis found:\n{_format_inputs(f.inputs)}")


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{value!r}    # shape {tuple(value.shape)}, {dtype}"
    return repr(value)


def _labelled(label: str, value: Any, indent: str = "") -> str:
    """``label value``, continuation lines of a multi-line repr aligned under it."""
    pad = " " * (len(indent) + len(label) + 1)
    lines = _format_value(value).split("\n")
    return "\n".join([f"{indent}{label} {lines[0]}"] + [pad + ln for ln in lines[1:]])


def _format_inputs(inputs: Inputs) -> str:
    width = max((len(k) for k in inputs), default=0)
    return "\n".join(_labelled(f"{k.ljust(width)} =", v, indent="    ")
                     for k, v in inputs.items())


def _one_line(error: BaseException) -> str:
    message = str(error).strip().split("\n")[0]
    kind = error.kind if isinstance(error, LearnerRaised) else type(error).__name__
    return f"{kind}: {message}" if message else kind


# Frames from these folders are library code, not the learner's.
_LIB_DIRS = tuple(str(Path(p).resolve()) for p in (
    Path(__file__).parent, Path(torch.__file__).parent,
    *(sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib"))))


def _user_frame(error: BaseException) -> Optional[traceback.FrameSummary]:
    """The deepest traceback frame in the learner's code (not torch, not the grader)."""
    if isinstance(error, LearnerRaised):           # raised in the learner's process
        w = error.where
        return traceback.FrameSummary("<cell>", w["lineno"], w["name"], line=w["line"]) \
            if isinstance(w, dict) else None
    frames = [fr for fr in traceback.extract_tb(error.__traceback__)
              if not str(Path(fr.filename).resolve()).startswith(_LIB_DIRS)]
    return frames[-1] if frames else None


def _print(text: str) -> None:
    """Print a report, falling back to ASCII marks on a console that cannot show emoji."""
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        print(text.replace(PASS_MARK, "[ok]").replace(FAIL_MARK, "[X]")
              .encode("ascii", "replace").decode("ascii"), flush=True)
