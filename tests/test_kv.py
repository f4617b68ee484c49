"""KV caches: prefill + decode with any cache, backend and chunking equals the naive oracle."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import describe_diff, first_difference, tiny_config, tiny_configs, tiny_model

from minfer.generate import generate_tokens
from minfer.kv import (ContiguousKVCache, QuantizedKVCache, SlidingWindowKVCache, StaticKVCache, dequantize_kv,
                       kv_cache_bytes, make_cache, quantize_kv)
from minfer.naive import naive_forward, naive_generate
from minfer.sampling import SamplingParams


def run_chunks(model, ids, cache, cuts, backend):
    """Feed ids (1, T) through the model in the chunks given by cut points; concatenated logits."""
    bounds = [0, *cuts, ids.shape[1]]
    outs = [model(ids[:, a:b], torch.arange(a, b)[None], kv_cache=cache, attention=backend)
            for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(outs, dim=1)[0]


@settings(max_examples=40, deadline=None)
@given(cfg=tiny_configs(), length=st.integers(1, 30), data=st.data(),
       backend=st.sampled_from(["reference", "sdpa", "flash"]), ring=st.booleans(), static=st.booleans())
def test_chunked_prefill_and_decode_equal_naive(cfg, length, data, backend, ring, static):
    """Random chunk splits (single tokens = decode) through a cache give the oracle's logits
    (the static cache: every slot read, masked on the device, with room to spare)."""
    model = tiny_model(cfg, seed=length)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, length - 1)), max_size=6)))
    if ring and cfg.sliding_window:
        cache = SlidingWindowKVCache(cfg, 1, cfg.sliding_window)
    elif static:
        cache = StaticKVCache(cfg, 1, length + data.draw(st.integers(0, 9)))
    else:
        cache = ContiguousKVCache(cfg, 1, length)
    ours = run_chunks(model, ids, cache, cuts, backend)
    ref = naive_forward(model.state_dict(), cfg, ids[0].tolist())
    assert torch.allclose(ours, ref, atol=1e-4), describe_diff(ours, ref)


@settings(max_examples=25, deadline=None)
@given(cfg=tiny_configs(), prompt_len=st.integers(1, 10), n=st.integers(1, 12),
       backend=st.sampled_from(["reference", "sdpa", "flash"]), chunk=st.one_of(st.none(), st.integers(1, 4)))
def test_greedy_tokens_identical_to_naive(cfg, prompt_len, n, backend, chunk):
    model = tiny_model(cfg, seed=n)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(n)).tolist()
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    kind = "sliding" if cfg.sliding_window else "contiguous"
    ours = list(generate_tokens(model, prompt, params, kv_cache=kind, attention=backend, prefill_chunk=chunk))
    ref = naive_generate(model.state_dict(), cfg, prompt, params)
    assert ours == ref, first_difference(ours, ref)
    static = list(generate_tokens(model, prompt, params, kv_cache="static", attention=backend, prefill_chunk=chunk))
    assert static == ref, first_difference(static, ref)


@settings(max_examples=25, deadline=None)
@given(cfg=tiny_configs(window=False), length=st.integers(2, 20), data=st.data(),
       kind=st.sampled_from(["contiguous", "int8"]))
def test_rollback_then_decode_equals_never_going_past(cfg, length, data, kind):
    """Truncate to L, then feed the same tokens again: same logits as a cache that stopped at L."""
    model = tiny_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    L = data.draw(st.integers(1, length - 1))
    a = make_cache(kind, cfg, 1, length, dtype=torch.float32, device="cpu")
    model(ids, torch.arange(length)[None], kv_cache=a)                     # goes past L ...
    a.truncate(L)                                                          # ... and rolls back
    junk = torch.randint(0, cfg.vocab_size, (1, length - L))               # different tokens after L
    after_rollback = model(junk, torch.arange(L, length)[None], kv_cache=a)
    b = make_cache(kind, cfg, 1, length, dtype=torch.float32, device="cpu")
    model(ids[:, :L], torch.arange(L)[None], kv_cache=b)
    fresh = model(junk, torch.arange(L, length)[None], kv_cache=b)
    assert torch.allclose(after_rollback, fresh, atol=1e-5), describe_diff(after_rollback, fresh)


@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 16)),
       magnitude=st.floats(1e-6, 1e4), seed=st.integers(0, 2**16), zero_rows=st.booleans())
def test_int8_kv_error_within_half_a_step(shape, magnitude, seed, zero_rows):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    if zero_rows:
        x[..., 0, :] = 0.0
    q, scale = quantize_kv(x, "int8")
    err = (dequantize_kv(q, scale) - x).abs()
    bound = scale / 2 + 1e-6 * x.abs().amax(-1, keepdim=True) + 1e-30
    assert q.dtype == torch.int8 and bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("nkv,share,fmt", [(4, 1, None), (2, 1, None), (1, 1, None), (2, 2, None),
                                           (2, 1, "int8")])
def test_kv_bytes_formula_matches_tensors(nkv, share, fmt):
    cfg = tiny_config(num_hidden_layers=4, num_key_value_heads=nkv, kv_share_group=share)
    if fmt:
        cache = QuantizedKVCache(cfg, 1, 50, fmt=fmt)
        values = cache.k.nbytes + cache.v.nbytes
        assert values == kv_cache_bytes(cfg, 50, 1)
        assert cache.nbytes() < 0.5 * kv_cache_bytes(cfg, 50, 4)          # at least halved vs fp32
    else:
        cache = ContiguousKVCache(cfg, 1, 50)
        assert cache.nbytes() == kv_cache_bytes(cfg, 50, 4)


def test_sliding_window_cache_memory_is_O_window():
    cfg = tiny_config(sliding_window=4)
    model = tiny_model(cfg)
    cache = SlidingWindowKVCache(cfg, 1, 4)
    before = cache.nbytes()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    list(generate_tokens(model, [1, 2, 3], params, kv_cache="sliding"))
    assert cache.nbytes() == before == kv_cache_bytes(cfg, 4, 4)


def test_cross_layer_sharing_shrinks_cache_by_group():
    plain, shared = tiny_config(num_hidden_layers=6), tiny_config(num_hidden_layers=6, kv_share_group=3)
    assert ContiguousKVCache(plain, 1, 10).nbytes() == 3 * ContiguousKVCache(shared, 1, 10).nbytes()
    assert not hasattr(tiny_model(shared).model.layers[1].self_attn, "k_proj")


def test_cache_overflow_is_a_clear_error():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="positions must lie"):
        ContiguousKVCache(cfg, 1, 4).update(0, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), torch.arange(5)[None])


@settings(max_examples=10, deadline=None)
@given(cfg=tiny_configs(window=False, sharing=False), prompt_len=st.integers(1, 6), seed=st.integers(0, 50))
def test_contiguous_decode_skips_the_mask_and_equals_the_masked_path(cfg, prompt_len, seed):
    """A single sequence decoding one token attends unmasked (a backend's ``unmasked``, as
    ``sdpa_attention`` offers); the tokens equal those of the mask built every layer, and the oracle's."""
    from minfer.attention import BACKENDS, sdpa_attention
    from minfer.attention.sdpa import sdpa
    model, calls = tiny_model(cfg, seed), []

    def masked(*args, **kw):
        calls.append("masked")
        return sdpa_attention(*args, **kw)

    def unmasked(q, k, v):
        calls.append("unmasked")
        return sdpa(q, k, v)

    prompt = [(seed + i) % cfg.vocab_size for i in range(prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKENDS, "counted", masked)
        for offer in (True, False):
            mp.setattr(masked, "unmasked", unmasked, raising=False) if offer else mp.delattr(masked, "unmasked")
            runs.append(list(generate_tokens(model, prompt, params, kv_cache="contiguous", attention="counted")))
    assert runs[0] == runs[1] == naive_generate(model.state_dict(), cfg, prompt, params)
    L = cfg.num_hidden_layers        # the prefill (unmasked too when it is one token), 4 decode steps; then masked
    prefill = "unmasked" if prompt_len == 1 else "masked"
    assert calls == [prefill] * L + ["unmasked"] * 4 * L + ["masked"] * 5 * L
