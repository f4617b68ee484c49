"""Exercises of lesson 10 (compression beyond quantization): distillation, Medusa, H2O eviction, pruning."""
import math
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import (Exercise, Inputs, against_definition, close_problem, register, returned,
                                     tuple_problem)


@st.composite
def _kl_inputs(draw) -> Inputs:
    N, V = draw(st.integers(1, 4)), draw(st.integers(3, 12))
    k = draw(st.integers(1, V - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    logits = torch.randn(N, V, generator=g) * scale
    top = torch.log_softmax(torch.randn(N, V, generator=g) * scale, -1).topk(k, -1)
    T = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    return {"logits": logits, "topk_idx": top.indices, "topk_logp": top.values, "temperature": T}


def _kl_definition(logits, topk_idx, topk_logp, temperature) -> float:
    """Float64, position by position: tempered bins, KL, times T^2, mean."""
    total = 0.0
    for n in range(logits.shape[0]):
        s = torch.softmax(logits[n].double(), -1)
        idx = topk_idx[n].tolist()
        t = topk_logp[n].double().exp().tolist()
        t_bins = t + [max(1.0 - sum(t), 1e-6)]
        s_top = [float(s[i]) for i in idx]
        s_bins = s_top + [1.0 - sum(s_top)]
        tw = [b ** (1 / temperature) for b in t_bins]
        sw = [max(b, 1e-300) ** (1 / temperature) for b in s_bins]
        qt, qs = [w / sum(tw) for w in tw], [w / sum(sw) for w in sw]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(qt, qs) if a > 0)
    return temperature ** 2 * total / logits.shape[0]


def _kl_problem(inputs: Inputs, actual: Any, want: float, what: str) -> Optional[str]:
    try:
        got = float(actual)
    except (TypeError, ValueError):
        return returned(actual, "a number (a 0-d tensor is fine)")
    problem = close_problem(torch.tensor([want]), torch.tensor([got]), 1e-4, what=what)
    return None if problem is None else (problem + ". Fold both distributions onto the k teacher ids + one "
                                         "'rest' bin, divide the bin log-probs by T, softmax, KL, times T^2")


register(Exercise(
    name="compress.distill_kl",
    lesson="10_compression_beyond_quantization", function="topk_distill_kl",
    description="topk_distill_kl(logits (N,V), topk_idx (N,k), topk_logp (N,k), T) -> T^2 * mean KL over k+1 bins",
    reference="minfer.compress.losses:topk_distill_kl",
    inputs=_kl_inputs(),
    compare=lambda inputs, expected, actual: _kl_problem(inputs, actual, float(expected), "expected"),
    validate=lambda inputs, actual: _kl_problem(inputs, actual, _kl_definition(**inputs), "definition (float64)"),
    max_examples=60,
))


@st.composite
def _tree_inputs(draw) -> Inputs:
    raw = draw(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=3).map(tuple), min_size=1, max_size=8))
    nodes = {p[:d] for p in raw for d in range(1, len(p) + 1)}
    return {"paths": sorted(nodes, key=lambda p: (len(p), p))}


def _tree_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    paths = inputs["paths"]
    n = len(paths) + 1
    if not isinstance(actual, torch.Tensor) or tuple(actual.shape) != (n, n):
        got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
        return f"expected a bool tensor of shape {(n, n)}, got {got}"
    want = torch.zeros(n, n, dtype=torch.bool)
    want[:, 0] = True
    for i, p in enumerate(paths):
        for j, q in enumerate(paths):
            want[i + 1, j + 1] = p[:len(q)] == q
    bad = (actual.bool() != want).nonzero()
    if len(bad) == 0:
        return None
    i, j = bad[0].tolist()
    name = lambda r: "the root" if r == 0 else f"node {paths[r - 1]}"  # noqa: E731
    return (f"mask[{i}, {j}]: {name(i)} {'should' if want[i, j] else 'should NOT'} see {name(j)} "
            f"(a node sees the root, its ancestors and itself)")


register(Exercise(
    name="compress.medusa_tree_mask",
    lesson="10_compression_beyond_quantization", function="tree_mask",
    description="tree_mask(paths) -> (N+1, N+1) bool: row = query, col = key; the root is index 0",
    reference="minfer.speculative.medusa:tree_mask",
    inputs=_tree_inputs(),
    compare=against_definition(_tree_problem),
    max_examples=60,
))


@st.composite
def _h2o_inputs(draw) -> Inputs:
    S = draw(st.integers(1, 12))
    scores = draw(st.permutations(list(range(S))))            # distinct: no ties to break
    budget = draw(st.integers(1, 14))
    return {"scores": [float(s) for s in scores], "budget": budget, "recent": draw(st.integers(0, budget))}


def _h2o_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    scores, budget, recent = inputs["scores"], inputs["budget"], inputs["recent"]
    S = len(scores)
    if S <= budget:
        want = list(range(S))
    else:
        r = min(recent, budget)
        rest = sorted(range(S - r), key=lambda i: scores[i], reverse=True)[:budget - r]
        want = sorted(rest + list(range(S - r, S)))
    try:
        got = sorted(int(i) for i in actual)
    except (TypeError, ValueError):
        return returned(actual, "a list of token indices")
    if got == want:
        return None
    return (f"expected to keep {want}, yours {got}: keep the {recent} newest, then the highest "
            f"scores among the older ones, {budget} in all (all of them if S <= budget)")


register(Exercise(
    name="compress.h2o_keep",
    lesson="10_compression_beyond_quantization", function="h2o_keep",
    description="h2o_keep(scores, budget, recent) -> sorted indices kept: `recent` newest + heaviest hitters",
    reference="minfer.kv.evict:h2o_keep",
    inputs=_h2o_inputs(),
    compare=against_definition(_h2o_problem),
    max_examples=80,
))


@st.composite
def _prune_inputs(draw) -> Inputs:
    f, h = draw(st.integers(1, 8)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    scores = torch.tensor([float(s) for s in draw(st.permutations(list(range(f))))])   # distinct: no ties
    return {"gate": torch.randn(f, h, generator=g), "up": torch.randn(f, h, generator=g),
            "down": torch.randn(h, f, generator=g), "scores": scores, "keep": draw(st.integers(1, f))}


def _prune_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    scores, keep = inputs["scores"].tolist(), inputs["keep"]
    kept = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])
    want = (inputs["gate"][kept], inputs["up"][kept], inputs["down"][:, kept])
    problem = tuple_problem(actual, ("gate", "up", "down"))
    if problem:
        return problem
    for name, w, a in zip(("gate", "up", "down"), want, actual):
        if not isinstance(a, torch.Tensor) or a.shape != w.shape or not torch.equal(a, w):
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            return (f"scores {scores}, keep {keep}: expected channels {kept} kept, in their order; {name} "
                    f"expected shape {tuple(w.shape)}, yours "
                    f"{got}{'' if got != tuple(w.shape) else ' with other values'}. A channel is a row of "
                    f"gate and up and a column of down")
    return None


register(Exercise(
    name="compress.prune_ffn",
    lesson="10_compression_beyond_quantization", function="prune_ffn",
    description=("prune_ffn(gate (f,h), up (f,h), down (h,f), scores (f,), keep) -> the FFN with only its keep "
                 "highest-scoring channels, in their original order"),
    reference="minfer.compress.prune:prune_ffn",
    inputs=_prune_inputs(),
    compare=against_definition(_prune_problem),
    max_examples=60,
))
