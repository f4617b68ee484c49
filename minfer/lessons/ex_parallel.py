"""Exercises of lesson 11 (parallelism): tensor-parallel shards and traffic, GPipe, the disaggregated KV hand-off.
"""
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import Exercise, Inputs, against_definition, register, returned, tuple_problem


@st.composite
def _shard_inputs(draw) -> Inputs:
    world = draw(st.integers(1, 4))
    out_f = world * draw(st.integers(1, 3))
    in_f = world * draw(st.integers(1, 3))
    W = torch.arange(out_f * in_f, dtype=torch.float32).view(out_f, in_f)   # every entry tells where it sat
    return {"weight": W, "rank": draw(st.integers(0, world - 1)), "world": world,
            "kind": draw(st.sampled_from(["column", "row"]))}


def _shard_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    W, r, n, kind = inputs["weight"], inputs["rank"], inputs["world"], inputs["kind"]
    want = torch.chunk(W, n, dim=0 if kind == "column" else 1)[r]          # the definition, another way
    if not isinstance(actual, torch.Tensor):
        return returned(actual, "a tensor")
    if tuple(actual.shape) != tuple(want.shape):
        return (f"{kind} parallel over {n} ranks of a {tuple(W.shape)} weight (out, in): expected shape "
                f"{tuple(want.shape)}, yours {tuple(actual.shape)}. Column parallel splits the OUTPUT "
                f"features (rows of an nn.Linear weight), row parallel the INPUT features (columns)")
    if not torch.equal(actual, want):
        return (f"{kind} parallel, rank {r} of {n}: right shape, wrong entries; expected the "
                f"{'rows' if kind == 'column' else 'columns'} starting at {r} x "
                f"{want.shape[0 if kind == 'column' else 1]}")
    return None


register(Exercise(
    name="parallel.shard_weight",
    lesson="11_parallelism", function="shard_weight",
    description=("shard_weight(W (out, in), rank, world, kind) -> W[r*out/N:(r+1)*out/N] for kind='column', "
                 "W[:, r*in/N:(r+1)*in/N] for kind='row'"),
    reference="minfer.distributed.layers:shard_weight",
    inputs=_shard_inputs(),
    compare=against_definition(_shard_problem),
))


def _bytes_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    h, L, n, b = (inputs[k] for k in ("hidden_size", "num_layers", "tp", "bytes_per_element"))
    per_allreduce = h * b * 2 * (n - 1) / n             # reduce-scatter + all-gather of one vector
    want = 2 * L * per_allreduce
    try:
        got = float(actual)
    except (TypeError, ValueError):
        return returned(actual, "a number of bytes")
    if abs(got - want) <= 1e-6 * max(1.0, want):
        return None
    return (f"hidden {h}, {L} layers, TP={n}, {b} bytes/element: expected {want:.1f} bytes = 2 all-reduces "
            f"per layer x {L} layers x (2 (N-1)/N = {2 * (n - 1) / n:.3g}) x {h * b} bytes per vector; yours "
            f"{got:.1f}")


register(Exercise(
    name="parallel.allreduce_bytes_per_token",
    lesson="11_parallelism", function="allreduce_bytes_per_token",
    description=("allreduce_bytes_per_token(hidden_size, num_layers, tp, bytes_per_element) -> bytes one rank "
                 "sends per token for the 2 ring all-reduces of every layer"),
    reference="minfer.distributed.tensor_parallel:allreduce_bytes_per_token",
    inputs=st.builds(dict, hidden_size=st.sampled_from([64, 576, 4096, 8192]), num_layers=st.integers(1, 80),
                     tp=st.sampled_from([1, 2, 4, 8]), bytes_per_element=st.sampled_from([1, 2, 4])),
    compare=against_definition(_bytes_problem),
))


def _gpipe_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    S, M = inputs["num_stages"], inputs["num_microbatches"]
    want = [[t - s if 0 <= t - s < M else -1 for t in range(M + S - 1)] for s in range(S)]
    try:
        got = [[int(x) for x in row] for row in actual]
    except (TypeError, ValueError):
        return returned(actual, f"a list of {S} rows (one per stage) of ints")
    if got == want:
        return None
    return (f"{S} stages, {M} micro-batches: expected {want}, yours {got}. Row s has M + S - 1 time slots; "
            f"micro-batch m reaches stage s in slot s + m, and -1 marks an idle slot (the bubble)")


register(Exercise(
    name="parallel.gpipe_schedule",
    lesson="11_parallelism", function="gpipe_schedule",
    description=("gpipe_schedule(num_stages, num_microbatches) -> per stage, the micro-batch it runs in each of "
                 "the M + S - 1 time slots (-1: idle)"),
    reference="minfer.distributed.pipeline:gpipe_schedule",
    inputs=st.builds(lambda s, m: {"num_stages": s, "num_microbatches": m}, st.integers(1, 5), st.integers(1, 6)),
    compare=against_definition(_gpipe_problem),
))


def kv_handoff_bytes(prompt_len: int, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                     bytes_per_element: int) -> int:
    """Bytes the prefill worker sends for one prompt: K and V of every layer, in whole blocks."""
    blocks = -(-prompt_len // block_size)
    return 2 * num_layers * blocks * block_size * num_kv_heads * head_dim * bytes_per_element


def _handoff_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    want = kv_handoff_bytes(**inputs)
    if isinstance(actual, (int, float)) and not isinstance(actual, bool) and actual == want:
        return None
    P, bs = inputs["prompt_len"], inputs["block_size"]
    return (f"{inputs}: expected {want} bytes = 2 (K and V) x {inputs['num_layers']} layers x {-(-P // bs)} "
            f"whole blocks of {bs} slots x {inputs['num_kv_heads']} K/V heads x {inputs['head_dim']} x "
            f"{inputs['bytes_per_element']} bytes; yours {actual!r}")


register(Exercise(
    name="parallel.kv_handoff_bytes",
    lesson="11_parallelism", function="kv_handoff_bytes",
    description=("kv_handoff_bytes(prompt_len, num_layers, num_kv_heads, head_dim, block_size, bytes_per_element) "
                 "-> bytes of K/V a prefill worker sends for one prompt, in whole blocks"),
    reference="minfer.lessons.ex_parallel:kv_handoff_bytes",
    inputs=st.builds(dict, prompt_len=st.integers(1, 40), num_layers=st.integers(1, 4),
                     num_kv_heads=st.integers(1, 4), head_dim=st.sampled_from([1, 2, 8, 16]),
                     block_size=st.sampled_from([1, 4, 16]), bytes_per_element=st.sampled_from([1, 2, 4])),
    compare=against_definition(_handoff_problem),
))


@st.composite
def _prompt_kv_inputs(draw) -> Inputs:
    L, nb, bs = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.sampled_from([1, 2, 4]))
    shape = (L, nb, bs, 1, 2)
    k = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)   # every entry says where it sat
    table = draw(st.permutations(list(range(nb))))[:draw(st.integers(1, nb))]
    return {"k": k, "v": -k, "block_table": table, "prompt_len": draw(st.integers(1, len(table) * bs))}


def _prompt_kv_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    k, v, table, P = inputs.values()
    bs = k.shape[2]
    blocks = table[:-(-P // bs)]
    want = (torch.stack([k[:, b] for b in blocks], 1), torch.stack([v[:, b] for b in blocks], 1))
    problem = tuple_problem(actual, ("k", "v"))
    if problem:
        return problem
    for name, w, a in zip("kv", want, actual):
        if not isinstance(a, torch.Tensor) or a.shape != w.shape or not torch.equal(a, w):
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            return (f"block table {table}, {P} prompt tokens, blocks of {bs}: expected blocks {blocks} of "
                    f"every layer, {name} of shape {tuple(w.shape)}; yours {got}"
                    f"{' with other values' if got == tuple(w.shape) else ''}")
    return None


register(Exercise(
    name="parallel.prompt_kv",
    lesson="11_parallelism", function="prompt_kv",
    description=("prompt_kv(k, v (L, blocks, bs, nkv, hd), block_table, prompt_len) -> the K and V blocks holding "
                 "the prompt, in block-table order: (L, ceil(prompt_len / bs), bs, nkv, hd) each"),
    reference="minfer.distributed.disagg:prompt_kv",
    inputs=_prompt_kv_inputs(),
    compare=against_definition(_prompt_kv_problem),
))
