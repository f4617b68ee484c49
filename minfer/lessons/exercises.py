"""The exercise registry: one property, graded for the learner and the engine alike.

An *exercise* is a function the learner writes in a lesson notebook. It is
graded by a hypothesis property: draw random inputs, run minfer's own
implementation (the *reference*) and the learner's function on them, and
compare the two. The engine's test suite runs the very same property against
the engine's implementation, so a learner is graded by exactly the check that
the engine passes:

    # in a notebook                          # in tests/
    check("model.rms_norm", my_rms_norm)     get("model.rms_norm").run(minfer.model.rms_norm)

The parts of an exercise (see ``Exercise``):

- ``inputs``: a hypothesis strategy that draws a dict of arguments, in the
  order of the function's parameters. Arguments are passed *positionally*, so
  a learner may name the parameters as they like.
- ``reference``: ``"module:function"``, imported only when the exercise runs
  (the engine may import this package, and this package must not import the
  whole engine at import time).
- ``compare(inputs, expected, actual)``: returns ``None`` when ``actual`` is
  acceptable, else a short human explanation of what is wrong (shown to the
  learner under the counterexample).
- ``validate(inputs, actual)`` (optional): a check against the *definition*
  that does not use the reference (a float64 formula, an invariant). Without
  it, running the property on the engine itself would only compare the engine
  with itself; with it, ``run(engine_fn)`` is a real property test.

How to add an exercise
----------------------
Write a strategy and (if ``allclose``/``exact`` do not fit) a comparison, then
register a dataclass instance at the bottom of this module (registration
runs at import)::

    @st.composite
    def _softmax_inputs(draw):
        x = draw(float_lists(-20.0, 20.0, min_size=1, max_size=8))
        return {"x": torch.tensor(x)}

    register(Exercise(
        name="sampling.softmax",
        description="softmax(x) over the last dim, in float32",
        reference="minfer.sampling:softmax",
        inputs=_softmax_inputs(),
        compare=allclose(atol=1e-6),
    ))

Then add the engine's function to ``ENGINE`` in ``tests/test_grader.py`` (that
runs ``get("sampling.softmax").run(minfer.sampling.softmax)``), and in the
lesson write a ``solution`` cell defining ``softmax`` followed by a cell
``check("sampling.softmax", softmax)`` (see ``minfer.lessons.notebooks``).

Keep inputs small (a few dozen elements): hypothesis shrinks a failure to the
smallest example it can, and that example is what the learner reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from hypothesis import strategies as st

Inputs = dict[str, Any]
Compare = Callable[[Inputs, Any, Any], Optional[str]]
Validate = Callable[[Inputs, Any], Optional[str]]

_REGISTRY: dict[str, "Exercise"] = {}


# ---------------------------------------------------------------------------
# The exercise record and the registry
# ---------------------------------------------------------------------------


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
    # What a solution cell may use besides builtins: the grader runs the cell
    # after ``prelude`` in a fresh interpreter (``autograde``). ``allowed`` are
    # the minfer functions ("module:qualname") a solution may call (helpers
    # the lesson hands out); any other call into minfer is "the engine's own
    # implementation" and is rejected.
    prelude: str = "import math\nimport torch\n"
    allowed: tuple[str, ...] = ()

    def load_reference(self) -> Callable:
        """Import and return the reference implementation (``"module:function"``).

        Inside ``minfer.lessons.use(...)`` this is still the engine's own
        function, not the learner's that replaced it.
        """
        from minfer.lessons.swap import original

        return original(self.reference)

    @property
    def reference_name(self) -> str:
        """The reference as a dotted name, for reports: ``minfer.model.rms_norm``."""
        return self.reference.replace(":", ".")

    def run(self, fn: Callable, *, max_examples: Optional[int] = None,
            reference: Optional[Callable] = None) -> None:
        """Run the property on ``fn``; raise ``AssertionError`` with the report if it fails.

        This is the form for ``tests/``: the engine passes exactly the property
        the learner is graded by. ``reference`` replaces the engine's reference
        (for testing the grader itself).
        """
        from minfer.lessons.grader import grade  # grader imports this module

        result = grade(self, fn, max_examples=max_examples, reference=reference)
        if not result.passed:
            raise AssertionError(result.message)


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


# ---------------------------------------------------------------------------
# Building blocks for strategies
# ---------------------------------------------------------------------------


def float_lists(lo: float, hi: float, min_size: int = 0,
                max_size: int | None = None) -> st.SearchStrategy:
    """Lists of float32-representable finite floats in [lo, hi] (no subnormals).

    Hypothesis shrinks each value towards 0 and simple numbers (1.0, 2.0) and
    deletes list elements: counterexamples come out small and readable.
    """
    values = st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False,
                       allow_subnormal=False)
    return st.lists(values, min_size=min_size, max_size=max_size)


def rows_tensor(rows: list[list[float]], width: int) -> torch.Tensor:
    """A float32 (len(rows), width) tensor: each row cut or zero-padded to ``width``.

    Shrink-friendly shapes: draw the width from one list (``len(weight)``)
    and the rows as independent lists, rather than drawing a size first and
    then exactly that many values. Then making the width smaller does not
    shift every value drawn after it, and hypothesis can shrink both.
    """
    return torch.tensor([(r + [0.0] * width)[:width] for r in rows], dtype=torch.float32)


def float_tensors(shape: tuple[int, ...], lo: float, hi: float) -> st.SearchStrategy:
    """float32 tensors of a fixed ``shape`` with values in [lo, hi] (see ``float_lists``)."""
    n = math.prod(shape)
    return float_lists(lo, hi, min_size=n, max_size=n).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32).reshape(shape))


# ---------------------------------------------------------------------------
# Building blocks for comparisons
# ---------------------------------------------------------------------------


def tensor_problem(expected: torch.Tensor, actual: Any) -> Optional[str]:
    """What is wrong with the *kind* of ``actual`` (type, shape, dtype), or None."""
    if not isinstance(actual, torch.Tensor):
        hint = " (did you forget `return`?)" if actual is None else ""
        return f"returned {type(actual).__name__}{hint}, expected a torch.Tensor"
    if actual.shape != expected.shape:
        return (f"returned shape {tuple(actual.shape)}, expected shape "
                f"{tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        return f"returned dtype {actual.dtype}, expected {expected.dtype}"
    return None


def _index(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    """Unravel a flat index into a tuple index of ``shape``."""
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(idx))


def close_problem(expected: torch.Tensor, actual: torch.Tensor, atol: float,
                  what: str = "expected") -> Optional[str]:
    """Compare two same-shape tensors; tolerance ``atol * max(1, max|expected|)``.

    NaN or inf where the expected value is finite always counts as wrong.
    Returns the max abs error and the first wrong position, or None.
    """
    e = expected.detach().to(torch.float64)
    a = actual.detach().to(torch.float64)
    scale = max(1.0, float(e[e.isfinite()].abs().max())) if e.isfinite().any() else 1.0
    tol = atol * scale
    err = (a - e).abs()
    same = (a == e) | (err <= tol)               # a == e: matching infinities
    if bool(same.all()):
        return None
    err = torch.where(same, torch.zeros_like(err), err)
    max_err = "nan" if bool(err.isnan().any()) else f"{float(err.max()):.3g}"
    first = int((~same).flatten().nonzero()[0])
    idx = _index(first, e.shape)
    return (f"first wrong at index {idx}: {what} {float(e[idx])!r}, yours "
            f"{float(a[idx])!r}; max abs error {max_err} > tolerance {tol:.3g} "
            f"({atol:g} x scale {scale:.3g})")


def allclose(atol: float) -> Compare:
    """A ``compare`` for tensor outputs: same type/shape/dtype, values within
    ``atol`` relative to the scale of the expected output (``close_problem``)."""

    def compare(inputs: Inputs, expected: torch.Tensor, actual: Any) -> Optional[str]:
        return tensor_problem(expected, actual) or close_problem(expected, actual, atol)

    compare.__doc__ = f"same shape and dtype, values within {atol:g} x scale"
    return compare


def exact() -> Compare:
    """A ``compare`` that demands equality (tensors: same shape, dtype, values)."""

    def compare(inputs: Inputs, expected: Any, actual: Any) -> Optional[str]:
        if isinstance(expected, torch.Tensor):
            problem = tensor_problem(expected, actual)
            if problem:
                return problem
            if torch.equal(expected, actual):
                return None
            first = int((expected != actual).flatten().nonzero()[0])
            idx = _index(first, expected.shape)
            return (f"first difference at index {idx}: expected "
                    f"{expected[idx].item()!r}, yours {actual[idx].item()!r}")
        return None if actual == expected else f"expected {expected!r}, yours {actual!r}"

    return compare


# ---------------------------------------------------------------------------
# model.rms_norm
# ---------------------------------------------------------------------------

RMS_NORM_ATOL = 1e-5


@st.composite
def _rms_norm_inputs(draw) -> Inputs:
    weight = draw(float_lists(-4.0, 4.0, min_size=1, max_size=16))
    d = len(weight)
    rows = draw(st.lists(float_lists(-100.0, 100.0, max_size=16), min_size=1, max_size=4))
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1]))
    layout = draw(st.sampled_from(["(d,)", "(n, d)", "(n, 1, d)"]))
    x = rows_tensor(rows, d)                                    # (n, d)
    x = {"(d,)": x[0], "(n, d)": x, "(n, 1, d)": x[:, None, :]}[layout]
    return {"x": x, "weight": torch.tensor(weight, dtype=torch.float32), "eps": eps}


def _validate_rms_norm(inputs: Inputs, actual: torch.Tensor) -> Optional[str]:
    """Compare with the definition, evaluated in float64."""
    x = inputs["x"].to(torch.float64)
    w = inputs["weight"].to(torch.float64)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + inputs["eps"]) * w
    return close_problem(want, actual, RMS_NORM_ATOL, what="definition (float64)")


register(Exercise(
    name="model.rms_norm",
    lesson="01_prefill_and_decode", function="rms_norm",
    description=("rms_norm(x (..., d), weight (d,), eps) = "
                 "x * rsqrt(mean(x^2, last dim) + eps) * weight, float32"),
    reference="minfer.model:rms_norm",
    inputs=_rms_norm_inputs(),
    compare=allclose(RMS_NORM_ATOL),
    validate=_validate_rms_norm,
))


# ---------------------------------------------------------------------------
# sampling.top_p
# ---------------------------------------------------------------------------

TOP_P_MASS_TOL = 1e-5   # cumulative probabilities this close to top_p are a coin toss


@st.composite
def _top_p_inputs(draw) -> Inputs:
    rows = draw(st.lists(float_lists(-10.0, 10.0, min_size=1, max_size=12),
                         min_size=1, max_size=3))
    vocab = len(rows[0])
    logits = rows_tensor(rows, vocab)                          # (B, V)
    # Some tokens may already be masked (-inf), as after a top-k filter;
    # at least one token of each row stays finite.
    for row in logits:
        masked = draw(st.lists(st.booleans(), max_size=vocab))
        masked = (masked + [False] * vocab)[:vocab]
        if all(masked):
            masked[0] = False
        row[torch.tensor(masked)] = -math.inf
    # top_p from 1e-6: below ~1e-45 a float32 comparison rounds top_p to 0, a
    # float-format trivia the lesson is not about.
    top_p = draw(st.floats(1e-6, 1.0))
    batched = draw(st.booleans())
    return {"logits": logits if batched else logits[0], "top_p": top_p}


def _kept(t: torch.Tensor) -> list[int]:
    """Indices of the entries of a 1-D tensor that are not -inf."""
    return [i for i, v in enumerate(t.tolist()) if v != -math.inf]


def _sorted_probs(row: torch.Tensor) -> str:
    """'token 2: 0.665, token 0: 0.245, ...' for one row of logits (float64 softmax)."""
    p = torch.softmax(row.to(torch.float64), -1)
    order = torch.sort(p, descending=True, stable=True).indices.tolist()
    return ", ".join(f"token {i}: {p[i].item():.4g}" for i in order if p[i] > 0)


def _tokens(k: int, which: str) -> str:
    """'the 3 kept tokens hold' / 'the kept token holds' (for nucleus messages)."""
    return f"the {which} token holds" if k == 1 else f"the {k} {which} tokens hold"


def nucleus_problem(logits: torch.Tensor, top_p: float, out: torch.Tensor) -> Optional[str]:
    """Does ``out`` keep a valid nucleus of ``logits``?  None if so, else why not.

    The definition, row by row: every entry of ``out`` is either its input
    logit (kept) or exactly -inf (removed); the kept tokens are the k most
    likely ones; and k is the smallest count whose probability mass reaches
    top_p. Masses within ``TOP_P_MASS_TOL`` of top_p may go either way, and
    among tokens with equal logits any may be kept: both are rounding or
    tie-breaking choices, not mistakes.
    """
    removed = out == -math.inf
    changed = ~removed & ~(out == logits)
    if bool(changed.any()):
        idx = _index(int(changed.flatten().nonzero()[0]), logits.shape)
        return (f"at index {idx} the input logit is {logits[idx].item()!r} but yours is "
                f"{out[idx].item()!r}: kept tokens keep their logit unchanged, "
                f"removed tokens become exactly -inf")
    vocab = logits.shape[-1]
    rows_in, rows_kept = logits.reshape(-1, vocab), ~removed.reshape(-1, vocab)
    for r in range(rows_in.shape[0]):
        where = f"row {r}: " if logits.dim() > 1 else ""
        row, kept = rows_in[r], rows_kept[r]
        k = int(kept.sum())
        if k == 0:
            return f"{where}every token was removed; the most likely token must always be kept"
        if k < vocab:
            worst_kept = int(torch.where(kept, row, math.inf).argmin())
            best_removed = int(torch.where(kept, -math.inf, row).argmax())
            if not kept[best_removed] and row[worst_kept] < row[best_removed]:
                return (f"{where}kept token {worst_kept} (logit {row[worst_kept].item():g}) "
                        f"but removed the more likely token {best_removed} "
                        f"(logit {row[best_removed].item():g})")
        probs = torch.sort(torch.softmax(row.to(torch.float64), -1), descending=True).values
        mass = torch.cumsum(probs, 0)
        if mass[k - 1] < top_p - TOP_P_MASS_TOL:
            return (f"{where}too few tokens: {_tokens(k, 'kept')} probability "
                    f"{mass[k - 1].item():.6g} < top_p = {top_p!r}\n"
                    f"probabilities, most likely first: {_sorted_probs(row)}")
        if k > 1 and mass[k - 2] >= top_p + TOP_P_MASS_TOL:
            return (f"{where}too many tokens: {_tokens(k - 1, 'most likely')} probability "
                    f"{mass[k - 2].item():.6g} >= top_p = {top_p!r} already, "
                    f"yet {k} are kept\n"
                    f"probabilities, most likely first: {_sorted_probs(row)}")
    return None


def _compare_top_p(inputs: Inputs, expected: torch.Tensor, actual: Any) -> Optional[str]:
    """Same -inf pattern and kept values as the reference.

    Where the pattern differs only by a tie or a rounding-level boundary
    (``nucleus_problem`` finds nothing wrong), the answer is accepted too.
    """
    problem = tensor_problem(expected, actual)
    if problem:
        return problem
    removed_a, removed_e = actual == -math.inf, expected == -math.inf
    if torch.equal(removed_a, removed_e) and torch.equal(      # NaN never equals: good
            actual.masked_fill(removed_a, 0.0), expected.masked_fill(removed_e, 0.0)):
        return None
    logits = inputs["logits"]
    why = nucleus_problem(logits, inputs["top_p"], actual)
    if why is None:
        return None      # a different but equally valid tie-break or rounding
    vocab = logits.shape[-1]
    rows_e, rows_a = expected.reshape(-1, vocab), actual.reshape(-1, vocab)
    lines = [why]
    for r in range(rows_e.shape[0]):
        kept_e, kept_a = _kept(rows_e[r]), _kept(rows_a[r])
        if kept_e != kept_a:
            where = f"row {r}: " if logits.dim() > 1 else ""
            lines.append(f"{where}expected keeps tokens {kept_e}, yours keeps {kept_a}")
    return "\n".join(lines)


def _validate_top_p(inputs: Inputs, actual: torch.Tensor) -> Optional[str]:
    """The nucleus definition, checked without the reference."""
    return nucleus_problem(inputs["logits"], inputs["top_p"], actual)


register(Exercise(
    name="sampling.top_p",
    lesson="01_prefill_and_decode", function="top_p",
    description=("top_p_filter(logits (V,) or (B, V), top_p in [1e-6, 1]) -> logits with "
                 "every token outside the nucleus set to -inf"),
    reference="minfer.sampling:top_p_filter",
    inputs=_top_p_inputs(),
    compare=_compare_top_p,
    validate=_validate_top_p,
))

# Lesson modules that register their own exercises (imported last: they use the names above).
from minfer.lessons import ex_paged  # noqa: E402,F401  lesson 04: paged attention
from minfer.lessons import ex_foundations  # noqa: E402,F401  lessons 02-03: kv.append, online softmax
from minfer.lessons import ex_spec  # noqa: E402,F401  lesson 07: speculative decoding
from minfer.lessons import ex_quant  # noqa: E402,F401  lesson 06: weight-only quantization
from minfer.lessons import ex_serving  # noqa: E402,F401  lesson 05: serving metrics, continuous batching
from minfer.lessons import ex_service  # noqa: E402,F401  lesson 09: routing, the cost of a token
from minfer.lessons import ex_parallel  # noqa: E402,F401  lesson 11: tensor-parallel shards, all-reduce bytes
from minfer.lessons import ex_loops  # noqa: E402,F401  cumulative exercises: whole loops on a model
from minfer.lessons import ex_compress  # noqa: E402,F401  lesson 10: distillation, Medusa, KV eviction
from minfer.lessons import ex_compilers  # noqa: E402,F401  lesson 08: fused qkv, bucket padding, MBU
