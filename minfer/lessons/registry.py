"""The exercise record and the registry: one property, graded for the learner and the engine alike
(``check("model.rms_norm", fn)`` in a notebook, the engine in ``tests/``; docs/teaching.md)."""
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from hypothesis import strategies as st

Inputs = dict[str, Any]
Compare = Callable[[Inputs, Any, Any], Optional[str]]
Validate = Callable[[Inputs, Any], Optional[str]]

_REGISTRY: dict[str, "Exercise"] = {}


@dataclass(frozen=True)
class Exercise:
    """One gradable function: inputs to draw, the reference, how to compare."""

    name: str                        # "module.function", e.g. "model.rms_norm"
    description: str                 # one line, shown by ``minfer.lessons.describe``
    reference: str                   # "package.module:function", imported lazily
    inputs: st.SearchStrategy        # draws a dict {param name: value}, in parameter order
    compare: Compare                 # (inputs, expected, actual) -> None or what is wrong
    validate: Optional[Validate] = None   # (inputs, actual) -> None or what is wrong;
                                          # runs only once compare has accepted actual
    max_examples: int = 100          # examples per run (stops at the first failure)
    # Where the learner writes it, for ``minfer lessons grade`` and ``--use-solutions``:
    lesson: str = ""                 # the notebook's stem, e.g. "01_prefill_and_decode"
    function: str = ""               # the name the solution cell defines, e.g. "rms_norm"
    points: int = 1                  # what a pass is worth in the score table
    # What a solution cell may use: ``prelude`` runs before it (``autograde``), and it may call the
    # minfer helpers ``allowed`` ("module:qualname"); any other call into minfer is rejected.
    prelude: str = "import math\nimport torch\n"
    allowed: tuple[str, ...] = ()

    def load_reference(self) -> Callable:
        """Import the reference (``"module:function"``): the engine's own, even inside ``use(...)``."""
        from minfer.lessons.swap import original

        return original(self.reference)


def register(exercise: Exercise) -> Exercise:
    """Add ``exercise`` to the registry (a name may be registered only once)."""
    if exercise.name in _REGISTRY and _REGISTRY[exercise.name] is not exercise:
        raise ValueError(f"exercise {exercise.name!r} is already registered")
    _REGISTRY[exercise.name] = exercise
    return exercise


def get(name: str) -> Exercise:
    """The exercise called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise ValueError(f"unknown exercise {name!r}; known exercises: {known}") from None


def names() -> list[str]:
    """All registered exercise names, sorted."""
    return sorted(_REGISTRY)


# --- Building blocks for strategies ---
def float_lists(lo: float, hi: float, min_size: int = 0,
                max_size: int | None = None) -> st.SearchStrategy:
    """Lists of float32-representable finite floats in [lo, hi] (no subnormals); hypothesis shrinks
    them towards 0, simple numbers and fewer elements: counterexamples come out small and readable."""
    values = st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False,
                       allow_subnormal=False)
    return st.lists(values, min_size=min_size, max_size=max_size)


def rows_tensor(rows: list[list[float]], width: int) -> torch.Tensor:
    """A float32 (len(rows), width) tensor: each row cut or zero-padded to ``width``. Shrink-friendly:
    the width comes from one list and the rows are independent lists, so both shrink."""
    return torch.tensor([(r + [0.0] * width)[:width] for r in rows], dtype=torch.float32)


def float_tensors(shape: tuple[int, ...], lo: float, hi: float, whole: bool = False) -> st.SearchStrategy:
    """float32 tensors of a fixed ``shape`` with values in [lo, hi] (see ``float_lists``); ``whole``: whole
    numbers only, so that a counterexample reads easily."""
    n = math.prod(shape)
    values = st.lists(st.integers(lo, hi), min_size=n, max_size=n) if whole else float_lists(lo, hi, n, n)
    return values.map(lambda xs: torch.tensor(xs, dtype=torch.float32).reshape(shape))


# --- Building blocks for comparisons ---
def returned(actual: Any, want: str, show: bool = False) -> str:
    """"returned <type> [<repr>], expected <want>", with a hint when ``actual`` is None (no ``return``)."""
    if actual is None:
        return f"returned None (did you forget `return`?), expected {want}"
    return f"returned {type(actual).__name__}{f' {actual!r}' if show else ''}, expected {want}"


def is_number(x: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def number_problem(actual: Any, want: float, what: str, explain: str, rel_tol: float = 1e-9,
                   abs_tol: float = 0.0) -> Optional[str]:
    """None if ``actual`` is a number close to ``want``; else ``returned`` (not a number) or ``explain``."""
    if not is_number(actual):
        return returned(actual, what, show=True)
    return None if math.isclose(actual, want, rel_tol=rel_tol, abs_tol=abs_tol) else explain


def against_definition(problem: Validate) -> Compare:
    """A ``compare`` that ignores the reference's output: ``problem(inputs, actual)`` computes the
    definition itself, so running the property on the engine is a real test without a ``validate``."""
    return lambda inputs, expected, actual: problem(inputs, actual)


def tensor_problem(expected: torch.Tensor, actual: Any) -> Optional[str]:
    """What is wrong with the *kind* of ``actual`` (type, shape, dtype), or None."""
    if not isinstance(actual, torch.Tensor):
        return returned(actual, "a torch.Tensor")
    if actual.shape != expected.shape:
        return (f"returned shape {tuple(actual.shape)}, expected shape "
                f"{tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        return f"returned dtype {actual.dtype}, expected {expected.dtype}"
    return None


def first_index(wrong: torch.Tensor) -> tuple[int, ...]:
    """The index of the first True entry of the bool tensor ``wrong``."""
    return tuple(int(i) for i in wrong.nonzero()[0])


def close_problem(expected: torch.Tensor, actual: torch.Tensor, atol: float,
                  what: str = "expected") -> Optional[str]:
    """The max abs error and the first wrong position, or None; tolerance ``atol * max(1, max|expected|)``
    (NaN or inf where the expected value is finite is always wrong)."""
    e, a = expected.detach().double(), actual.detach().double()
    scale = max(1.0, float(e[e.isfinite()].abs().max())) if e.isfinite().any() else 1.0
    tol = atol * scale
    err = (a - e).abs()
    same = (a == e) | (err <= tol)               # a == e: matching infinities
    if bool(same.all()):
        return None
    err = torch.where(same, torch.zeros_like(err), err)
    max_err = "nan" if bool(err.isnan().any()) else f"{float(err.max()):.3g}"
    idx = first_index(~same)
    return (f"first wrong at index {idx}: {what} {float(e[idx])!r}, yours "
            f"{float(a[idx])!r}; max abs error {max_err} > tolerance {tol:.3g} "
            f"({atol:g} x scale {scale:.3g})")


def allclose(atol: float) -> Compare:
    """A ``compare`` for tensor outputs: same type/shape/dtype, values within ``close_problem``'s ``atol``."""

    def compare(inputs: Inputs, expected: torch.Tensor, actual: Any) -> Optional[str]:
        return tensor_problem(expected, actual) or close_problem(expected, actual, atol)

    compare.__doc__ = f"same shape and dtype, values within {atol:g} x scale"
    return compare


def exact(inputs: Inputs, expected: Any, actual: Any) -> Optional[str]:
    """A ``compare`` that demands equality (tensors: same shape, dtype, values)."""
    if isinstance(expected, torch.Tensor):
        problem = tensor_problem(expected, actual)
        if problem or torch.equal(expected, actual):
            return problem
        idx = first_index(expected != actual)
        return (f"first difference at index {idx}: expected "
                f"{expected[idx].item()!r}, yours {actual[idx].item()!r}")
    return None if actual == expected else f"expected {expected!r}, yours {actual!r}"


def tuple_problem(actual: Any, names: tuple[str, ...], of: str = "tensors") -> Optional[str]:
    """What is wrong with the *kind* of a tuple answer, e.g. ``(keys, values)``, or None."""
    want = f"a tuple ({', '.join(names)}) of {len(names)} {of}"
    if not isinstance(actual, (tuple, list)):
        return returned(actual, want)
    if len(actual) != len(names):
        return f"returned {len(actual)} values, expected {want}"
    return None


def tuple_close(names: tuple[str, ...], expected: Any, actual: Any, atol: float,
                what: str = "expected") -> Optional[str]:
    """``tuple_problem``, then ``tensor_problem`` and ``close_problem`` on each named tensor."""
    problem = tuple_problem(actual, names)
    for name, e, a in zip(names, expected, actual if problem is None else ()):
        problem = tensor_problem(e, a) or close_problem(e, a, atol, what=what)
        if problem:
            return f"{name}: {problem}"
    return problem
