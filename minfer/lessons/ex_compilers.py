"""Exercises of lesson 08 (compilers and kernels): fused projections, bucket padding, MBU.

References: ``qkv_fused`` and ``pad_to_bucket`` below as plain functions (the engine stacks ``qkv_proj``
once at load time in ``minfer/model.py`` and picks the bucket with ``bucket_for`` in
``minfer/engine/cuda_graph.py``), ``pad_batch`` (``StaticDecodeRunner.load``), ``minfer.bench.machine.mbu``.
"""
import math
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import (Exercise, Inputs, against_definition, close_problem, float_tensors,
                                     is_number, number_problem, register, tuple_problem)

QKV_ATOL = 1e-5


def qkv_fused(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor):
    """(q, k, v) = (x wq^T, x wk^T, x wv^T) with one matmul (vLLM stacks once: ``QKVParallelLinear``).

    x (..., d); wq (nq, d), wk (nk, d), wv (nk, d) -> q (..., nq), k (..., nk), v (..., nk)."""
    w = torch.cat([wq, wk, wv], dim=0)                       # (nq + 2 nk, d)
    y = x @ w.T                                              # (..., nq + 2 nk): one matmul
    return tuple(torch.split(y, [wq.shape[0], wk.shape[0], wv.shape[0]], dim=-1))


@st.composite
def _qkv_inputs(draw) -> Inputs:
    d = draw(st.integers(1, 8))
    head = draw(st.integers(1, 4))
    nq, nk = head * draw(st.sampled_from([1, 2, 4])), head * draw(st.sampled_from([1, 2]))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 1)]))
    return {"x": draw(float_tensors(lead + (d,), -4.0, 4.0)), "wq": draw(float_tensors((nq, d), -2.0, 2.0)),
            "wk": draw(float_tensors((nk, d), -2.0, 2.0)), "wv": draw(float_tensors((nk, d), -2.0, 2.0))}


def _qkv_problem(inputs: Inputs, actual: Any, want: tuple, what: str) -> Optional[str]:
    problem = tuple_problem(actual, ("q", "k", "v"))
    if problem:
        return problem
    for name, e, a in zip("qkv", want, actual):
        if not isinstance(a, torch.Tensor):
            return f"{name} is a {type(a).__name__}, expected a tensor"
        if tuple(a.shape) != tuple(e.shape):
            return (f"{name} has shape {tuple(a.shape)}, expected {tuple(e.shape)}: x "
                    f"{tuple(inputs['x'].shape)} times the transposed weight "
                    f"({tuple(inputs['w' + name].shape)} -> last dim {inputs['w' + name].shape[0]}); split "
                    f"the fused output at nq and nq + nk")
        problem = close_problem(e, a, QKV_ATOL, what=what)
        if problem:
            return f"{name}: {problem}"
    return None


def _validate_qkv(inputs: Inputs, actual: Any) -> Optional[str]:
    """Three separate matmuls in float64: the definition the fused one must equal."""
    x = inputs["x"].double()
    want = tuple(x @ inputs[w].double().T for w in ("wq", "wk", "wv"))
    return _qkv_problem(inputs, actual, want, "three separate matmuls (float64) give")


register(Exercise(
    name="fusion.qkv_fused",
    lesson="08_compilers_and_kernels", function="qkv_fused",
    description="qkv_fused(x (..., d), wq (nq, d), wk (nk, d), wv (nk, d)) -> (q, k, v) from one matmul "
                "with the stacked weight, split along the last dim",
    reference="minfer.lessons.ex_compilers:qkv_fused",
    inputs=_qkv_inputs(),
    compare=lambda inputs, expected, actual: _qkv_problem(inputs, actual, expected, "expected"),
    validate=_validate_qkv,
))


def pad_to_bucket(n: int, sizes: Sequence[int]) -> tuple[int, int]:
    """(bucket, padded rows) for a decode batch of ``n`` <= max(sizes) sequences: the smallest capture
    size that holds them (``sizes`` in any order), and the bucket - n rows whose outputs are thrown away."""
    bucket = min(s for s in sizes if s >= n)
    return bucket, bucket - n


@st.composite
def _bucket_inputs(draw) -> Inputs:
    sizes = draw(st.lists(st.integers(1, 64), min_size=1, max_size=7, unique=True))
    if draw(st.booleans()):
        sizes = sorted(sizes)                          # engines keep them sorted; a solution may not rely on it
    n = draw(st.integers(1, max(sizes)))
    return {"n": n, "sizes": tuple(sizes)}


def _bucket_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    n, sizes = inputs["n"], inputs["sizes"]
    fits = sorted(s for s in sizes if s >= n)
    want = (fits[0], fits[0] - n)
    problem = tuple_problem(actual, ("bucket", "padded rows"), of="ints")
    if problem:
        return problem
    got = tuple(int(a) if isinstance(a, int) or (isinstance(a, torch.Tensor) and a.numel() == 1) else a
                for a in actual)
    if got == want:
        return None
    if got[0] != want[0]:
        why = (f"{got[0]} is not a capture size" if got[0] not in sizes else
               f"{got[0]} cannot hold {n} sequences" if got[0] < n else
               f"{got[0]} holds them, but {want[0]} is a smaller size that does too")
        return (f"n = {n}, capture sizes {list(sizes)}: expected bucket {want[0]} (the smallest size >= n), "
                f"yours {got[0]}: {why}")
    return (f"n = {n} in bucket {want[0]}: expected {want[1]} padded rows (bucket - n), yours {got[1]!r}")


register(Exercise(
    name="cuda_graph.pad_to_bucket",
    lesson="08_compilers_and_kernels", function="pad_to_bucket",
    description="pad_to_bucket(n, sizes) -> (smallest size >= n, number of padded rows) for a decode batch",
    reference="minfer.lessons.ex_compilers:pad_to_bucket",
    inputs=_bucket_inputs(),
    compare=against_definition(_bucket_problem),
))


def _mbu_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    b, tps, bw = inputs["bytes_per_token"], inputs["tokens_per_s"], inputs["bandwidth"]
    want = b * tps / bw
    hint = " (a fraction, not a percentage)" if is_number(actual) and math.isclose(actual, 100 * want) else ""
    return number_problem(actual, want, "a fraction (1.0 = the whole bandwidth)",
                          f"{b:.4g} bytes per token x {tps:.4g} tokens/s = {b * tps:.4g} bytes/s achieved, "
                          f"over {bw:.4g} bytes/s: expected {want!r}, yours {actual!r}{hint}", abs_tol=1e-15)


register(Exercise(
    name="roofline.mbu",
    lesson="08_compilers_and_kernels", function="mbu",
    description="mbu(bytes_per_token, tokens_per_s, bandwidth) -> the share of the memory bandwidth a "
                "decode run used (bytes read per token x tokens/s / bandwidth)",
    reference="minfer.bench.machine:mbu",
    inputs=st.builds(dict, bytes_per_token=st.floats(1e3, 1e12), tokens_per_s=st.floats(0.01, 1e5),
                     bandwidth=st.floats(1e8, 1e13)),
    compare=against_definition(_mbu_problem),
))


def pad_batch(tokens: list, positions: list, slots: list, context_lens: list, bucket: int, scratch_slot: int):
    """The engine's static decode runner (``StaticDecodeRunner.load``) on a batch of len(tokens) decodes:
    its first ``bucket`` rows of input ids, positions, slots and context lengths, as lists."""
    from minfer.kv.paged import PagedBatch
    runner = _static_runner()
    runner.sizes, runner.scratch_slot = [bucket], scratch_slot
    S = len(tokens)
    runner.load(torch.tensor([tokens]), PagedBatch(
        query_lens=torch.ones(S, dtype=torch.long), seq_lens=torch.tensor(context_lens),
        block_tables=torch.zeros(S, 1, dtype=torch.long), slot_mapping=torch.tensor(slots),
        logits_indices=torch.arange(S), positions=torch.tensor([positions])))
    return tuple(t.reshape(-1)[:bucket].tolist() for t in (runner.input_ids, runner.positions, runner.slot_mapping,
                                                           runner.context_lens))


@lru_cache(maxsize=None)
def _static_runner():
    """One static runner over a one-layer random model, shared by every call of ``pad_batch``."""
    from minfer.config import ModelConfig
    from minfer.engine.cuda_graph import StaticDecodeRunner
    from minfer.kv.paged import PagedKVCache
    from minfer.model import build_model
    cfg = ModelConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, intermediate_size=8, max_position_embeddings=64)
    return StaticDecodeRunner(build_model(cfg), PagedKVCache(cfg, 4, 16), 0, 64, use_cuda_graph=False)


@st.composite
def _pad_inputs(draw) -> Inputs:
    S = draw(st.integers(1, 6))
    rows = st.lists(st.integers(0, 999), min_size=S, max_size=S)
    return {"tokens": draw(rows), "positions": draw(rows), "slots": draw(rows),
            "context_lens": [p + 1 for p in draw(rows)], "bucket": S + draw(st.integers(0, 5)),
            "scratch_slot": 16 * draw(st.integers(0, 3))}


def _pad_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    S, n = len(inputs["tokens"]), inputs["bucket"]
    names = ("tokens", "positions", "slots", "context_lens")
    problem = tuple_problem(actual, names, of="lists")
    if problem:
        return problem
    for name, pad, got in zip(names, (0, 0, inputs["scratch_slot"], 1), actual):
        want = list(inputs[name]) + [pad] * (n - S)
        try:
            got = [int(x) for x in got]
        except (TypeError, ValueError):
            return f"{name}: expected a list of {n} ints, got {type(got).__name__}"
        if got != want:
            return (f"{S} real rows in a bucket of {n}, scratch slot {inputs['scratch_slot']}: {name} "
                    f"expected {want}, yours {got}. Keep the real rows, then pad to the bucket with token 0, "
                    f"position 0, the scratch slot and a context of 1 key")
    return None


register(Exercise(
    name="cuda_graph.pad_batch",
    lesson="08_compilers_and_kernels", function="pad_batch",
    description=("pad_batch(tokens, positions, slots, context_lens, bucket, scratch_slot) -> the 4 lists padded to "
                 "`bucket` rows: token 0, position 0, the scratch slot, a context of 1"),
    reference="minfer.lessons.ex_compilers:pad_batch",
    inputs=_pad_inputs(),
    compare=against_definition(_pad_problem),
))
