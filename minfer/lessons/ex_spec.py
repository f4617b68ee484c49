"""Exercises of lesson 07 (speculative decoding): the accept/reject rule, n-gram lookup, lookahead's pool."""
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import (Exercise, Inputs, against_definition, close_problem, float_lists,
                                     register, returned, tuple_problem)

ACCEPT_ATOL = 1e-5


def _normalise(weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32)
    if float(w.sum()) <= 1e-3:                     # (nearly) all zero: make it uniform
        w = torch.ones_like(w)
    return w / w.sum()


@st.composite
def _accept_reject_inputs(draw) -> Inputs:
    V = draw(st.integers(2, 8))
    weights = float_lists(0.0, 1.0, min_size=V, max_size=V)
    p = _normalise(draw(weights))
    kind = draw(st.sampled_from(["random", "random", "equal to p", "one-hot"]))
    if kind == "random":
        q = _normalise(draw(weights))
    elif kind == "equal to p":
        q = p.clone()
    else:
        q = torch.nn.functional.one_hot(torch.tensor(draw(st.integers(0, V - 1))), V).float()
    support = [i for i in range(V) if q[i] > 0]
    x = draw(st.sampled_from(support))             # the draft token was drawn from q: q(x) > 0
    return {"p": p, "q": q, "x": x}


def _accept_reject_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    """Both parts against the definition, in float64."""
    problem = tuple_problem(actual, ("accept_probability", "residual_distribution"), of="values")
    if problem:
        return problem
    accept, residual = actual
    p, q, x = inputs["p"].double(), inputs["q"].double(), inputs["x"]
    want_accept, r = min(1.0, float(p[x] / q[x])), (p - q).clamp(min=0)      # r.sum(): the rejection mass
    try:
        accept = float(accept)
    except (TypeError, ValueError):
        return f"the accept probability should be a number, got {type(accept).__name__}"
    if abs(accept - want_accept) > ACCEPT_ATOL:
        return (f"accept probability for x = {x}: expected min(1, p(x)/q(x)) = min(1, {float(p[x]):.4g} / "
                f"{float(q[x]):.4g}) = {want_accept:.6g}, yours {accept:.6g}")
    if not isinstance(residual, torch.Tensor) or residual.shape != inputs["p"].shape:
        got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        return f"the residual should be a tensor of shape {tuple(inputs['p'].shape)}, got {got}"
    if float(r.sum()) < 1e-6:                      # p == q: a rejection never happens
        return None
    problem = close_problem(r / r.sum(), residual.detach().double(), ACCEPT_ATOL)
    return None if problem is None else f"residual norm(max(0, p - q)): {problem}"


register(Exercise(
    name="speculative.accept_reject",
    lesson="07_speculative_decoding", function="accept_reject",
    description=("accept_reject(p (V,), q (V,), x) -> (min(1, p[x] / q[x]), norm(max(0, p - q))): "
                 "speculative sampling's rule for one draft token x ~ q, target p"),
    reference="minfer.speculative.rejection:accept_reject",
    inputs=_accept_reject_inputs(),
    compare=against_definition(_accept_reject_problem),
))


@st.composite
def _ngram_inputs(draw) -> Inputs:
    tokens = draw(st.lists(st.integers(0, 3), min_size=1, max_size=16))
    min_n = draw(st.integers(1, 3))
    return {"tokens": tokens, "min_n": min_n, "max_n": draw(st.integers(min_n, 4)),
            "k": draw(st.integers(1, 5))}


def _ngram_definition(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Written differently from the engine: list every match, then pick."""
    L = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= L:
            continue
        starts = [i for i in range(L - n) if tokens[i:i + n] == tokens[L - n:]]
        if starts:
            return tokens[starts[0] + n:starts[0] + n + k]
    return []


def _ngram_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    want = _ngram_definition(**inputs)
    try:
        got = [int(t) for t in actual]
    except (TypeError, ValueError):
        return returned(actual, "a list of token ids")
    if got == want:
        return None
    return (f"expected {want}, yours {got}. Rule: for n = max_n down to min_n, find the EARLIEST "
            f"earlier occurrence of the last n tokens that is followed by at least one token, and "
            f"return up to k tokens after it ([] if no n matches)")


register(Exercise(
    name="speculative.ngram_propose",
    lesson="07_speculative_decoding", function="ngram_propose",
    description=("ngram_propose(tokens, min_n, max_n, k) -> up to k tokens that followed the earliest "
                 "earlier occurrence of the longest suffix n-gram (min_n <= n <= max_n)"),
    reference="minfer.speculative.prompt_lookup:ngram_propose",
    inputs=_ngram_inputs(),
    compare=against_definition(_ngram_problem),
))


def pool_harvest(pool: dict, levels: list, new: list, per_key: int) -> dict:
    """The engine's ``NgramPool.harvest`` on a copy of ``pool`` ({first token: [rest, ...]}, most recent last)."""
    from minfer.speculative.lookahead import NgramPool
    engine_pool = NgramPool(per_key)
    engine_pool.grams = {k: list(v) for k, v in pool.items()}
    engine_pool.harvest(levels, new)
    return engine_pool.grams


@st.composite
def _pool_inputs(draw) -> Inputs:
    W, N, per_key = draw(st.integers(1, 4)), draw(st.integers(2, 4)), draw(st.integers(1, 3))
    tok = st.integers(0, 3)
    gram = st.lists(tok, min_size=N - 1, max_size=N - 1).map(tuple)
    pool = {k: draw(st.lists(gram, min_size=1, max_size=per_key, unique=True))
            for k in draw(st.lists(tok, max_size=3, unique=True))}
    levels = [draw(st.lists(tok, min_size=W, max_size=W)) for _ in range(N - 1)]
    return {"pool": pool, "levels": levels, "new": draw(st.lists(tok, min_size=W, max_size=W)), "per_key": per_key}


def _pool_definition(pool, levels, new, per_key) -> dict:
    """Written differently from the engine: build each column's n-gram, then filter and cut."""
    out = {k: list(v) for k, v in pool.items()}
    for column in zip(*levels, new):
        grams = [g for g in out.get(column[0], []) if g != column[1:]] + [column[1:]]
        out[column[0]] = grams[len(grams) - per_key:] if len(grams) > per_key else grams
    return out


def _pool_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    want = _pool_definition(**inputs)
    if not isinstance(actual, dict):
        return returned(actual, "the pool, a dict {first token: [n-gram rest, ...]}")
    try:
        got = {int(k): [tuple(int(t) for t in g) for g in v] for k, v in actual.items() if len(v)}
    except (TypeError, ValueError):
        return "the pool should map a token to a list of tuples of tokens"
    if got == want:
        return None
    key = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
    return (f"levels {inputs['levels']}, new {inputs['new']}, per_key {inputs['per_key']}: for key {key} "
            f"expected {want.get(key, [])}, yours {got.get(key, [])}. Column i gives the n-gram "
            f"(levels[0][i], levels[1][i], ..., new[i]), filed under its first token: a known one moves to "
            f"the end, a new one is appended, and only the last per_key stay (most recent last)")


register(Exercise(
    name="lookahead.ngram_pool",
    lesson="07_speculative_decoding", function="pool_harvest",
    description=("pool_harvest(pool, levels, new, per_key) -> the pool with each window column's n-gram "
                 "(levels[0][i], ..., new[i]) filed under its first token, the last per_key kept"),
    reference="minfer.lessons.ex_spec:pool_harvest",
    inputs=_pool_inputs(),
    compare=against_definition(_pool_problem),
))
