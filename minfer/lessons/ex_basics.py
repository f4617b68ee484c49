"""Lesson 01's exercises: ``model.rms_norm`` and ``sampling.top_p``."""
import math
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import (Exercise, Inputs, allclose, close_problem, first_index, float_lists,
                                     register, rows_tensor, tensor_problem)

RMS_NORM_ATOL = 1e-5
TOP_P_MASS_TOL = 1e-5   # cumulative probabilities this close to top_p are a coin toss


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
    x, w = inputs["x"].double(), inputs["weight"].double()
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


def _sorted_probs(row: torch.Tensor) -> str:
    """'token 2: 0.665, token 0: 0.245, ...' for one row of logits (float64 softmax)."""
    p = torch.softmax(row.to(torch.float64), -1)
    order = torch.sort(p, descending=True, stable=True).indices.tolist()
    return ", ".join(f"token {i}: {p[i].item():.4g}" for i in order if p[i] > 0)


def _tokens(k: int, which: str) -> str:
    """'the 3 kept tokens hold' / 'the kept token holds' (for nucleus messages)."""
    return f"the {which} token holds" if k == 1 else f"the {k} {which} tokens hold"


def nucleus_problem(logits: torch.Tensor, top_p: float, out: torch.Tensor) -> Optional[str]:
    """Why ``out`` is not a valid nucleus of ``logits``, or None. Row by row: each entry is its logit
    (kept) or exactly -inf; the kept tokens are the k most likely, k the smallest count whose mass
    reaches top_p. Ties, and masses within ``TOP_P_MASS_TOL`` of top_p, may go either way."""
    removed = out == -math.inf
    changed = ~removed & ~(out == logits)
    if bool(changed.any()):
        idx = first_index(changed)
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
    """Same -inf pattern and kept values as the reference, or a pattern that differs only by a tie
    or a rounding-level boundary (``nucleus_problem`` finds nothing wrong)."""
    if problem := tensor_problem(expected, actual):
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
        kept_e, kept_a = ((rows[r] != -math.inf).nonzero().flatten().tolist() for rows in (rows_e, rows_a))
        if kept_e != kept_a:
            where = f"row {r}: " if logits.dim() > 1 else ""
            lines.append(f"{where}expected keeps tokens {kept_e}, yours keeps {kept_a}")
    return "\n".join(lines)


register(Exercise(
    name="sampling.top_p",
    lesson="01_prefill_and_decode", function="top_p",
    description=("top_p_filter(logits (V,) or (B, V), top_p in [1e-6, 1]) -> logits with "
                 "every token outside the nucleus set to -inf"),
    reference="minfer.sampling:top_p_filter",
    inputs=_top_p_inputs(),
    compare=_compare_top_p,
    validate=lambda inputs, actual: nucleus_problem(inputs["logits"], inputs["top_p"], actual),
))
