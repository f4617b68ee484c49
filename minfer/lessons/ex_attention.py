"""Exercises of lesson 03 (attention memory): the window mask, GQA attention, int8 KV.

The lesson runs SmolLM2 and Gemma 3 on the learner's GQA attention (the engine's backend signature)
through ``compare_with_engine(llm, prompt, attention=...)``.
"""
import math
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.ex_quant import _int8_problem
from minfer.lessons.registry import (Exercise, Inputs, against_definition, allclose, close_problem, exact,
                                      float_tensors, register, tensor_problem, tuple_problem)

GQA_ATOL = 1e-5


@st.composite
def _positions(draw, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_pos (B, T) consecutive, k_pos (B, S) in [-1, 9] (-1: an empty ring-buffer slot)."""
    T, S = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    starts = [draw(st.integers(0, 6)) for _ in range(batch)]
    q_pos = torch.tensor([[s + t for t in range(T)] for s in starts])
    k_pos = torch.tensor(draw(st.lists(st.lists(st.integers(-1, 9), min_size=S, max_size=S),
                                       min_size=batch, max_size=batch)))
    return q_pos, k_pos


@st.composite
def _mask_inputs(draw) -> Inputs:
    q_pos, k_pos = draw(_positions(draw(st.integers(1, 2))))
    return {"q_pos": q_pos, "k_pos": k_pos, "window": draw(st.none() | st.integers(1, 5))}


def _validate_mask(inputs: Inputs, actual: Any) -> Optional[str]:
    qp, kp, w = inputs["q_pos"].tolist(), inputs["k_pos"].tolist(), inputs["window"]
    for b, (qs, ks) in enumerate(zip(qp, kp)):
        for t, p in enumerate(qs):
            for s, j in enumerate(ks):
                want = 0 <= j <= p and (w is None or p - j < w)
                if bool(actual[b, t, s]) != want:
                    why = ("an empty slot (-1)" if j < 0 else "in the future" if j > p else
                           f"{p - j} positions back, window {w}")
                    return (f"[{b}, {t}, {s}]: query at position {p}, key at position {j} ({why}): "
                            f"visible should be {want}")
    return None


register(Exercise(
    name="attention.window_mask",
    lesson="03_attention_memory", function="window_mask",
    description=("window_mask(q_pos (B, T), k_pos (B, S), window) -> bool (B, T, S): key j visible to "
                 "query p iff 0 <= j <= p and (window is None or p - j < window)"),
    reference="minfer.attention.mask:allowed",
    inputs=_mask_inputs(),
    compare=exact,
    validate=_validate_mask,
))


@st.composite
def _gqa_inputs(draw) -> Inputs:
    B, nkv, g, hd = (draw(st.integers(1, n)) for n in (2, 2, 3, 4))
    q_pos, k_pos = draw(_positions(B))
    T, S = q_pos.shape[1], k_pos.shape[1]
    return {"q": draw(float_tensors((B, nkv * g, T, hd), -3.0, 3.0)),
            "k": draw(float_tensors((B, nkv, S, hd), -3.0, 3.0)),
            "v": draw(float_tensors((B, nkv, S, hd), -3.0, 3.0)),
            "q_pos": q_pos, "k_pos": k_pos, "window": draw(st.none() | st.integers(1, 4)),
            "scale": draw(st.none() | st.sampled_from([0.5, 0.0625]))}


def _validate_gqa(inputs: Inputs, actual: Any) -> Optional[str]:
    """Head by head: query head h reads K/V head h // (nh / nkv); softmax over visible keys only."""
    q, k, v = (inputs[n].double() for n in "qkv")
    B, nh, T, hd = q.shape
    group = nh // k.shape[1]
    scale = 1 / math.sqrt(hd) if inputs["scale"] is None else inputs["scale"]
    want = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            p = int(inputs["q_pos"][b, t])
            seen = [s for s, j in enumerate(inputs["k_pos"][b].tolist())
                    if 0 <= j <= p and (inputs["window"] is None or p - j < inputs["window"])]
            for h in range(nh):
                if seen:
                    kh, vh = k[b, h // group, seen], v[b, h // group, seen]
                    want[b, h, t] = torch.softmax(kh @ q[b, h, t] * scale, dim=0) @ vh
    return tensor_problem(want.float(), actual) or close_problem(
        want, actual, GQA_ATOL, what="per-head softmax (float64; a query that sees no key gives zeros)")


register(Exercise(
    name="attention.gqa_attention",
    lesson="03_attention_memory", function="gqa_attention",
    description=("gqa_attention(q (B, nh, T, hd), k, v (B, nkv, S, hd), q_pos (B, T), k_pos (B, S), window, "
                 "scale) -> (B, nh, T, hd): query head h reads K/V head h // (nh // nkv); masked keys "
                 "excluded, a query with no visible key gives zeros; scale None = 1/sqrt(hd)"),
    reference="minfer.attention.reference:reference_attention",
    inputs=_gqa_inputs(),
    compare=allclose(GQA_ATOL),
    validate=_validate_gqa,
))


@st.composite
def _kv_vectors(draw) -> Inputs:
    """K or V vectors (B, nkv, T, hd); some all zero, magnitudes 1e-3 .. 1e3."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    x = draw(float_tensors(shape, -4.0, 4.0))
    if draw(st.booleans()):
        x[..., 0, :] = 0.0
    return {"x": x * draw(st.sampled_from([1.0, 1e-3, 1e3]))}


def _validate_kv_int8(inputs: Inputs, actual: Any) -> Optional[str]:
    """Lesson 06's int8 definition with every vector as a row: scale = max|x| / 127, q within half a step."""
    x, problem = inputs["x"], tuple_problem(actual, ("q", "scale"))
    if problem:
        return problem
    problem = (tensor_problem(torch.zeros_like(x, dtype=torch.int8), actual[0])
               or tensor_problem(x[..., :1].float(), actual[1]))
    if problem:
        return f"q (..., hd) int8 or scale (..., 1) float32: {problem}"
    problem = _int8_problem({"w": x.reshape(-1, x.shape[-1])}, (actual[0].reshape(-1, x.shape[-1]),
                                                               actual[1].reshape(-1)))
    return problem and problem.replace("row ", "vector ").replace("w[", "x (as rows)[")


register(Exercise(
    name="kv.quantize_int8",
    lesson="03_attention_memory", function="quantize_kv_int8",
    description=("quantize_kv_int8(x (..., hd)) -> (q int8 (..., hd), scale float32 (..., 1)): one scale "
                 "per vector, max|x| / 127 (1.0 for an all-zero vector), q = round(x / scale)"),
    reference="minfer.kv.quantized:quantize_kv",
    inputs=_kv_vectors(),
    compare=against_definition(_validate_kv_int8),
))
