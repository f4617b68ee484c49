"""Exercises of lessons 02 and 03: the KV-cache append, one online-softmax step, arithmetic intensity."""
import math
from fractions import Fraction
from types import SimpleNamespace
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.lessons.registry import (
    Exercise, Inputs, against_definition, first_index, float_lists, float_tensors,
    number_problem, register, tensor_problem, tuple_close, tuple_problem,
)

ONLINE_SOFTMAX_ATOL = 1e-5
STATE = ("m", "l", "acc")


@st.composite
def _kv_append_inputs(draw) -> Inputs:
    B, nkv, hd = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    max_len = draw(st.integers(1, 6))
    # The write may start anywhere in the buffer: at the current length (prefill
    # or decode) or before it (after a rollback); slots past the write hold stale
    # values from earlier tokens that must not be returned.
    start = draw(st.integers(0, max_len - 1))
    T = draw(st.integers(1, max_len - start))
    buf, new = (B, nkv, max_len, hd), (B, nkv, T, hd)
    k_cache, v_cache, k, v = (draw(float_tensors(s, -9, 9, whole=True)) for s in (buf, buf, new, new))
    return {"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
            "positions": torch.arange(start, start + T)}


def kv_append_with_cache(k_cache, v_cache, k, v, positions):
    """The reference: ``ContiguousKVCache.update`` on these buffers, which it writes as the engine does.

    k_cache, v_cache (B, nkv, max_len, hd), k, v (B, nkv, T, hd), positions (T,) -> (keys, values),
    each (B, nkv, positions[-1] + 1, hd)."""
    from minfer.kv import ContiguousKVCache

    B, nkv, max_len, hd = k_cache.shape
    shape = SimpleNamespace(num_kv_layers=1, num_key_value_heads=nkv, head_dim=hd)
    cache = ContiguousKVCache(shape, B, max_len, dtype=k_cache.dtype, device=k_cache.device)
    cache.k[0].copy_(k_cache)
    cache.v[0].copy_(v_cache)
    keys, values, _ = cache.update(0, k, v, positions[None].expand(B, -1))
    k_cache.copy_(cache.k[0])
    v_cache.copy_(cache.v[0])
    S = keys.shape[2]
    return k_cache[:, :, :S], v_cache[:, :, :S]


def _exact_problem(name: str, expected: torch.Tensor, actual: Any) -> Optional[str]:
    problem = tensor_problem(expected, actual)
    if problem:
        return f"{name}: {problem}"
    if torch.equal(expected, actual):
        return None
    idx = b, h, s, d = first_index(expected != actual)
    return (f"{name}[{b}, {h}, {s}, {d}] (batch {b}, kv head {h}, slot {s}) should be "
            f"{expected[idx].item()!r}, yours is {actual[idx].item()!r}")


def _kv_append_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    """The definition, one position at a time: slot p holds the token written at p."""
    keys, values = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    positions = inputs["positions"].tolist()
    for t, p in enumerate(positions):
        keys[:, :, p] = inputs["k"][:, :, t]
        values[:, :, p] = inputs["v"][:, :, t]
    S, max_len = max(positions) + 1, keys.shape[2]
    problem, want = tuple_problem(actual, ("keys", "values")), (keys[:, :, :S], values[:, :, :S])
    for name, e, a in zip(("keys", "values"), want, actual if not problem else ()):
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[2] != S \
                and a.shape[:2] == e.shape[:2]:
            return (f"{name} has {a.shape[2]} slots, expected {S}: after writing positions "
                    f"{positions} the valid prefix is slots [0, {S}) of the {max_len}-slot buffer "
                    f"(later slots are stale or empty)")
        problem = _exact_problem(name, e, a)
        if problem:
            return problem
    return problem


register(Exercise(
    name="kv.append",
    lesson="02_kv_cache", function="kv_append",
    description=("kv_append(k_cache, v_cache (B, nkv, max_len, hd), k, v (B, nkv, T, hd), "
                 "positions (T,)) -> (keys, values) (B, nkv, positions[-1] + 1, hd): write the "
                 "new K/V at their positions, return the valid prefix"),
    reference="minfer.lessons.ex_foundations:kv_append_with_cache",
    inputs=_kv_append_inputs(),
    compare=against_definition(_kv_append_problem),
))


def _score_row(n: int) -> st.SearchStrategy:
    """One query's scores against n keys, some masked to -inf (causal mask, window, padding)."""
    return st.tuples(float_lists(-20.0, 20.0, min_size=n, max_size=n),
                     st.lists(st.booleans(), min_size=n, max_size=n)).map(
        lambda sm: [-math.inf if masked else x for x, masked in zip(*sm)])


@st.composite
def _online_softmax_inputs(draw) -> Inputs:
    tk_seen, tk, hd = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    # Query rows as a list, so that hypothesis can delete rows while shrinking.
    rows = draw(st.lists(st.tuples(_score_row(tk_seen), _score_row(tk)), min_size=1, max_size=3))
    seen_s = torch.tensor([r[0] for r in rows], dtype=torch.float32)        # (tq, tk_seen)
    scores = torch.tensor([r[1] for r in rows], dtype=torch.float32)        # (tq, tk)
    seen_v = float_tensors((tk_seen, hd), -5.0, 5.0)
    seen_v, values = draw(seen_v), draw(float_tensors((tk, hd), -5.0, 5.0))
    # The running state after the keys seen so far; a row that has seen no
    # visible key yet (all masked, or before the first tile) has m = -inf, l = 0, acc = 0.
    m = seen_s.amax(dim=-1, keepdim=True)                                   # (tq, 1)
    p = torch.where(torch.isinf(m), torch.zeros_like(seen_s), torch.exp(seen_s - m))
    inputs = {"m": m, "l": p.sum(dim=-1, keepdim=True), "acc": p @ seen_v,
              "scores": scores, "values": values}
    if draw(st.booleans()):                  # a leading head dim: (1, tq, ...), as in flash
        inputs = {k: v[None] for k, v in inputs.items()}
    return inputs


def _validate_online_softmax(inputs: Inputs, actual: Any) -> Optional[str]:
    """The new state from its meaning, in float64: l = sum exp(s - m), acc = sum exp(s - m) v over all
    keys seen, relative to the new maximum m (no visible key yet: m = -inf, l = 0, acc = 0)."""
    m, l, acc, s, v = (inputs[k].double() for k in ("m", "l", "acc", "scores", "values"))
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
    seen = torch.isfinite(m_new)                                            # (..., tq, 1)
    safe = torch.where(seen, m_new, torch.zeros_like(m_new))
    old_weight = torch.where(torch.isfinite(m), torch.exp(m - safe), torch.zeros_like(m))
    p = torch.exp(s - safe)                                                 # masked: exp(-inf) = 0
    want = (m_new, old_weight * l + p.sum(-1, keepdim=True), old_weight * acc + p @ v)
    actual = [a.to(torch.float64) if isinstance(a, torch.Tensor) else a for a in actual]
    return tuple_close(STATE, want, actual, ONLINE_SOFTMAX_ATOL, "definition (float64)")


register(Exercise(
    name="attention.online_softmax_update",
    lesson="03_attention_memory", function="online_softmax_update",
    description=("online_softmax_update(m, l (..., tq, 1), acc (..., tq, hd), scores (..., tq, tk), "
                 "values (..., tk, hd)) -> new (m, l, acc): FlashAttention's running max, sum "
                 "and unnormalised output after one more tile"),
    reference="minfer.attention.flash:online_softmax_update",
    inputs=_online_softmax_inputs(),
    compare=lambda inputs, expected, actual: tuple_close(STATE, expected, actual, ONLINE_SOFTMAX_ATOL),
    validate=_validate_online_softmax,
))


def _intensity_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    """The definition in exact fractions: 2 T in out FLOPs over b (in out + T in + T out) bytes."""
    T, k, n, b = (inputs[name] for name in ("num_tokens", "in_features", "out_features", "bytes_per_value"))
    want = float(Fraction(2 * T * k * n) / (Fraction(b) * (k * n + T * k + T * n)))
    return number_problem(actual, want, "a number (FLOP per byte)",
                          f"{2 * T * k * n} FLOPs (2 x {T} x {k} x {n}) over {b} x ({k} x {n} weights + "
                          f"{T} x {k} inputs + {T} x {n} outputs) bytes = {want:.6g} FLOP/byte; "
                          f"yours is {actual!r}")


register(Exercise(
    name="roofline.linear_intensity",
    lesson="02_kv_cache", function="linear_intensity",
    description=("linear_intensity(num_tokens, in_features, out_features, bytes_per_value) -> FLOP/byte of "
                 "y = x W^T: 2 T in out over the bytes of W, x and y"),
    reference="minfer.bench.machine:linear_intensity",
    inputs=st.builds(dict, num_tokens=st.integers(1, 4096), in_features=st.integers(1, 8192),
                     out_features=st.integers(1, 8192), bytes_per_value=st.sampled_from([4, 2, 1, 0.5])),
    compare=against_definition(_intensity_problem),
))
