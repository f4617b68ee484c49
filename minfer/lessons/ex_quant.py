"""Exercises of lesson 06 (weight-only quantization): int8 per row, int4 packing, GGUF's Q4_K.

References: ``minfer/quant/int8.py``, ``int4.py`` and ``gguf_formats.py`` (``tests/test_quant.py``
runs these same properties on them). ``quantize_int8`` is graded against its definition, so rounding
ties either way is accepted.
"""
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import (Exercise, Inputs, against_definition, allclose, close_problem, exact,
                                      first_index, float_lists, register, rows_tensor, tensor_problem,
                                      tuple_problem)


@st.composite
def _weights(draw) -> Inputs:
    """A small (N, K) matrix; some rows all zero or constant, magnitudes 1e-3 .. 1e3."""
    width = draw(st.integers(1, 8))
    rows = draw(st.lists(float_lists(-4.0, 4.0, max_size=8), min_size=1, max_size=4))
    w = rows_tensor(rows, width)                                 # (N, K)
    kinds = draw(st.lists(st.sampled_from(["random", "random", "zeros", "constant"]),
                          min_size=len(rows), max_size=len(rows)))
    for i, kind in enumerate(kinds):
        if kind == "zeros":
            w[i] = 0.0
        elif kind == "constant":
            w[i] = w[i, 0]
    return {"w": w * draw(st.sampled_from([1.0, 1e-3, 1e3]))}


def _int8_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    """Check (q, scale) against the definition of symmetric per-channel int8."""
    w, problem = inputs["w"], tuple_problem(actual, ("q", "scale"))
    if problem:
        return problem
    q, scale = actual
    for name, t, dtype, shape in [("q", q, torch.int8, tuple(w.shape)),
                                  ("scale", scale, torch.float32, (w.shape[0],))]:
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, expected a torch.Tensor"
        if t.dtype != dtype or tuple(t.shape) != shape:
            return (f"{name} has dtype {t.dtype} and shape {tuple(t.shape)}, expected {dtype} "
                    f"and shape {shape}")
    want = w.abs().amax(dim=1) / 127                             # (N,)
    for n in range(w.shape[0]):
        s, a = float(scale[n]), float(want[n])
        if a > 0 and abs(s - a) > 1e-6 * a:
            return (f"row {n}: max |w| = {a * 127:.6g}, so the scale is {a * 127:.6g} / 127 = "
                    f"{a:.6g}; yours is {s:.6g}")
        if a == 0 and not s > 0:
            return (f"row {n} is all zeros: any positive scale stores it exactly, but yours is "
                    f"{s:.6g} (dividing by it gives nan/inf)")
    if bool((q.to(torch.int32).abs() > 127).any()):
        return "q has a value outside [-127, 127]"
    err = (w - q.float() * scale[:, None]).abs()                 # (N, K)
    bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-6 * w.abs()
    bad = err > bound
    if bool(bad.any()):
        n, k = (int(i) for i in bad.nonzero()[0])
        return (f"w[{n}, {k}] = {float(w[n, k]):.6g} is stored as q = {int(q[n, k])}, i.e. "
                f"{int(q[n, k])} * {float(scale[n]):.6g} = {float(q[n, k]) * float(scale[n]):.6g}: "
                f"{float(err[n, k]):.3g} away, more than half a step ({float(scale[n]) / 2:.3g}); "
                f"round w / scale to the nearest integer")
    return None


register(Exercise(
    name="quant.quantize_int8",
    lesson="06_quantization", function="quantize_int8",
    description=("quantize_int8(w (N, K)) -> (q int8 (N, K), scale float32 (N,)): "
                 "scale = max|row| / 127 (1.0 for an all-zero row), q = round(w / scale)"),
    reference="minfer.quant.int8:quantize_int8",
    inputs=_weights(),
    compare=against_definition(_int8_problem),
))


@st.composite
def _int8_pairs(draw) -> Inputs:
    width = draw(st.integers(1, 8))
    rows = draw(st.lists(st.lists(st.integers(-127, 127), max_size=8), min_size=1, max_size=4))
    q = torch.tensor([(r + [0] * width)[:width] for r in rows], dtype=torch.int8)   # (N, K)
    scale = draw(float_lists(0.125, 10.0, min_size=len(rows), max_size=len(rows)))
    return {"q": q, "scale": torch.tensor(scale, dtype=torch.float32)}


def _validate_dequant(inputs: Inputs, actual: Any) -> Optional[str]:
    want = inputs["q"].double() * inputs["scale"].double()[:, None]
    return (tensor_problem(want.float(), actual)
            or close_problem(want, actual, 1e-6, what="q * scale (float64)"))


register(Exercise(
    name="quant.dequantize_int8",
    lesson="06_quantization", function="dequantize_int8",
    description="dequantize_int8(q int8 (N, K), scale (N,)) -> float32 (N, K): row n is q[n] * scale[n]",
    reference="minfer.quant.int8:dequantize_int8",
    inputs=_int8_pairs(),
    compare=allclose(1e-6),
    validate=_validate_dequant,
))


@st.composite
def _nibbles(draw) -> Inputs:
    half = draw(st.integers(1, 6))
    rows = draw(st.lists(st.lists(st.integers(0, 15), max_size=2 * half), min_size=1, max_size=3))
    q = torch.tensor([(r + [0] * 2 * half)[:2 * half] for r in rows], dtype=torch.uint8)  # (N, K)
    return {"q": q if draw(st.booleans()) else q[0]}


def _validate_pack(inputs: Inputs, actual: Any) -> Optional[str]:
    q = inputs["q"]
    want = (q[..., 0::2].int() + 16 * q[..., 1::2].int()).to(torch.uint8)
    problem = tensor_problem(want, actual)
    if problem or torch.equal(want, actual):
        return problem
    idx = first_index(want != actual)
    j = idx[-1]
    pair = (int(q[idx[:-1] + (2 * j,)]), int(q[idx[:-1] + (2 * j + 1,)]))
    return (f"byte {idx} should hold q[{2 * j}] = {pair[0]} in its low 4 bits and "
            f"q[{2 * j + 1}] = {pair[1]} in its high 4 bits: {pair[0]} | ({pair[1]} << 4) = "
            f"{int(want[idx])}; yours is {int(actual[idx])}")


register(Exercise(
    name="quant.pack_int4",
    lesson="06_quantization", function="pack_int4",
    description=("pack_int4(q uint8 (..., K) in 0..15, K even) -> uint8 (..., K/2): "
                 "byte j = q[2j] | q[2j+1] << 4"),
    reference="minfer.quant.int4:pack_int4",
    inputs=_nibbles(),
    compare=against_definition(_validate_pack),
))


@st.composite
def _packed(draw) -> Inputs:
    q = draw(_nibbles())["q"]
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return {"packed": packed, "k": q.shape[-1]}


def _validate_unpack(inputs: Inputs, actual: Any) -> Optional[str]:
    p = inputs["packed"]
    want = torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)
    problem = tensor_problem(want, actual)
    if problem or torch.equal(want, actual):
        return problem
    idx = first_index(want != actual)
    k = idx[-1]
    byte = int(p[idx[:-1] + (k // 2,)])
    part = "low 4 bits (byte & 15)" if k % 2 == 0 else "high 4 bits (byte >> 4)"
    return (f"value {idx} comes from the {part} of byte {k // 2} = {byte}: {int(want[idx])}; "
            f"yours is {int(actual[idx])}")


register(Exercise(
    name="quant.unpack_int4",
    lesson="06_quantization", function="unpack_int4",
    description="unpack_int4(packed uint8 (..., K/2), K) -> uint8 (..., K): the inverse of pack_int4",
    reference="minfer.quant.int4:unpack_int4",
    inputs=_packed(),
    compare=against_definition(_validate_unpack),
))


def _bytes(n: int) -> st.SearchStrategy:
    return st.lists(st.integers(0, 255), min_size=n, max_size=n)


def _validate_q4k_scales(inputs: Inputs, actual: Any) -> Optional[str]:
    """llama.cpp's ``get_scale_min_k4``, one sub-block j at a time, in Python ints."""
    want: tuple[list, list] = ([], [])
    for q in inputs["packed"].tolist():
        pairs = [(q[j] & 63, q[j + 4] & 63) for j in range(4)] + [
            ((q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) for j in range(4, 8)]
        for k in (0, 1):
            want[k].append([pair[k] for pair in pairs])
    problem = tuple_problem(actual, ("scales", "mins"))
    for name, w, a in zip(("scales", "mins"), want, actual if problem is None else ()):
        problem = problem or exact(inputs, torch.tensor(w, dtype=torch.float32), a)
        if problem:
            return (f"{name}: {problem} (sub-blocks 4-7: low 4 bits from bytes 8-11, high 2 bits from the "
                    f"top of bytes 0-3 for a scale, 4-7 for a min)")
    return problem


register(Exercise(
    name="quant.q4k_scales_mins",
    lesson="06_quantization", function="q4k_scales_mins",
    description=("q4k_scales_mins(packed uint8 (n, 12)) -> (scales, mins) float32 (n, 8): Q4_K's eight "
                 "6-bit scales and mins per super-block"),
    reference="minfer.quant.gguf_formats:_q4_k_scales_and_mins",
    inputs=st.builds(dict, packed=st.lists(_bytes(12), min_size=1, max_size=3).map(
        lambda rows: torch.tensor(rows, dtype=torch.uint8))),                   # (n, 12)
    compare=against_definition(_validate_q4k_scales),
))


@st.composite
def _q4k_blocks(draw) -> Inputs:
    """1 or 2 blocks of 144 bytes: finite f16 d and dmin, random scales and 4-bit values."""
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        d, dmin = (draw(st.sampled_from([0.0, 0.5, 2.0 ** -10, 0.013, -0.25, 3.0])) for _ in range(2))
        head = torch.tensor([d, dmin], dtype=torch.float16).view(torch.uint8).tolist()
        rows.append(head + draw(_bytes(12)) + draw(_bytes(128)))
    return {"blocks": torch.tensor(rows, dtype=torch.uint8)}                   # (n, 144)


def _validate_q4k_block(inputs: Inputs, actual: Any) -> Optional[str]:
    """gguf-py's own dequantizer (``gguf.quants``), where that package is installed."""
    try:
        import gguf
    except ImportError:                                    # pragma: no cover
        return None
    want = gguf.quants.dequantize(inputs["blocks"].numpy(), gguf.GGMLQuantizationType.Q4_K)
    return exact(inputs, torch.from_numpy(want).reshape(-1, 256), actual)


register(Exercise(
    name="quant.dequantize_q4_k",
    lesson="06_quantization", function="dequantize_q4_k",
    description=("dequantize_q4_k(blocks uint8 (n, 144)) -> float32 (n, 256): x = d * scale_s * q - "
                 "dmin * min_s for sub-block s, bit-exact with llama.cpp"),
    reference="minfer.quant.gguf_formats:dequantize_q4_k",
    inputs=_q4k_blocks(),
    compare=exact,
    validate=_validate_q4k_block,
))
