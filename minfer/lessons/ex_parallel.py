"""Exercises of lesson 11 (parallelism): a tensor-parallel shard, and the all-reduce volume per token.

    parallel.shard_weight               shard_weight(W, rank, world, kind) -> rank's column or row piece
    parallel.allreduce_bytes_per_token  allreduce_bytes_per_token(hidden, layers, tp, bytes) -> bytes sent

Registered on import (the catalogue ``minfer/lessons/exercises.py`` imports this module).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import Exercise, Inputs, register

# ---------------------------------------------------------------------------
# parallel.shard_weight
# ---------------------------------------------------------------------------


@st.composite
def _shard_inputs(draw) -> Inputs:
    world = draw(st.integers(1, 4))
    out_f = world * draw(st.integers(1, 3))
    in_f = world * draw(st.integers(1, 3))
    W = torch.arange(out_f * in_f, dtype=torch.float32).view(out_f, in_f)   # every entry tells where it sat
    return {"weight": W, "rank": draw(st.integers(0, world - 1)), "world": world,
            "kind": draw(st.sampled_from(["column", "row"]))}


def _shard_problem(inputs: Inputs, actual: Any, what: str) -> Optional[str]:
    W, r, n, kind = inputs["weight"], inputs["rank"], inputs["world"], inputs["kind"]
    want = torch.chunk(W, n, dim=0 if kind == "column" else 1)[r]          # the definition, another way
    if not isinstance(actual, torch.Tensor):
        hint = " (did you forget `return`?)" if actual is None else ""
        return f"returned {type(actual).__name__}{hint}; expected a tensor"
    if tuple(actual.shape) != tuple(want.shape):
        return (f"{kind} parallel over {n} ranks of a {tuple(W.shape)} weight (out, in): {what} shape "
                f"{tuple(want.shape)}, yours {tuple(actual.shape)}. Column parallel splits the OUTPUT "
                f"features (rows of an nn.Linear weight), row parallel the INPUT features (columns)")
    if not torch.equal(actual, want):
        return (f"{kind} parallel, rank {r} of {n}: right shape, wrong entries; {what} the "
                f"{'rows' if kind == 'column' else 'columns'} starting at {r} x {want.shape[0 if kind == 'column' else 1]}")
    return None


register(Exercise(
    name="parallel.shard_weight",
    lesson="11_parallelism", function="shard_weight",
    description=("shard_weight(W (out, in), rank, world, kind) -> W[r*out/N:(r+1)*out/N] for kind='column', "
                 "W[:, r*in/N:(r+1)*in/N] for kind='row'"),
    reference="minfer.distributed.layers:shard_weight",
    inputs=_shard_inputs(),
    compare=lambda inputs, expected, actual: _shard_problem(inputs, actual, "expected"),
    validate=lambda inputs, actual: _shard_problem(inputs, actual, "the definition gives"),
))


# ---------------------------------------------------------------------------
# parallel.allreduce_bytes_per_token
# ---------------------------------------------------------------------------


@st.composite
def _bytes_inputs(draw) -> Inputs:
    return {"hidden_size": draw(st.sampled_from([64, 576, 4096, 8192])), "num_layers": draw(st.integers(1, 80)),
            "tp": draw(st.sampled_from([1, 2, 4, 8])), "bytes_per_element": draw(st.sampled_from([1, 2, 4]))}


def _bytes_problem(inputs: Inputs, actual: Any, what: str) -> Optional[str]:
    h, L, n, b = (inputs[k] for k in ("hidden_size", "num_layers", "tp", "bytes_per_element"))
    per_allreduce = h * b * 2 * (n - 1) / n             # reduce-scatter + all-gather of one vector
    want = 2 * L * per_allreduce
    try:
        got = float(actual)
    except (TypeError, ValueError):
        return f"returned {type(actual).__name__}; expected a number of bytes"
    if abs(got - want) <= 1e-6 * max(1.0, want):
        return None
    return (f"hidden {h}, {L} layers, TP={n}, {b} bytes/element: {what} {want:.1f} bytes = 2 all-reduces per "
            f"layer x {L} layers x (2 (N-1)/N = {2 * (n - 1) / n:.3g}) x {h * b} bytes per vector; yours {got:.1f}")


register(Exercise(
    name="parallel.allreduce_bytes_per_token",
    lesson="11_parallelism", function="allreduce_bytes_per_token",
    description=("allreduce_bytes_per_token(hidden_size, num_layers, tp, bytes_per_element) -> bytes one rank "
                 "sends per token for the 2 ring all-reduces of every layer"),
    reference="minfer.distributed.tensor_parallel:allreduce_bytes_per_token",
    inputs=_bytes_inputs(),
    compare=lambda inputs, expected, actual: _bytes_problem(inputs, actual, "expected"),
    validate=lambda inputs, actual: _bytes_problem(inputs, actual, "the definition gives"),
))
