"""The paged KV cache keeps the math: every paged backend equals the one reference.

* Every paged backend (the split plan over the SDPA, reference and flash dense backends, the
  C++ decode kernel, the online teaching version, the static plan of captured decode steps)
  equals ``paged_attention_reference`` (fp32, atol 1e-4) for random batches of sequences
  mixing prefill, chunked prefill and decode with ragged lengths, random block sizes (block
  tables deliberately scattered over the pool), MHA/GQA/MQA, sliding windows, and unquantized,
  int8 and fp8 pages. The reference itself equals attention over contiguous K/V.
* Whole generations through the paged cache (batched, chunked, preempted,
  prefix-cached, forked for n > 1) are tested through ``LLM`` in test_llm.py.
"""
from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny import batch_of, describe_diff, tiny_config

from minfer.attention import reference_attention
from minfer.attention.paged import paged_attention_reference
from minfer.generate import generate_tokens
from minfer.kernels import cpu_paged_decode
from minfer.kv import kv_cache_bytes
from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.kv.paged import PagedKVCache
from minfer.kv.quantized import STORAGE
from minfer.sampling import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)
# (attention_mode, dense backend, decode kernel): every way the engine can attend through pages
PAGED_BACKENDS = [("split", "sdpa", "torch"), ("split", "reference", "torch"), ("split", "flash", "torch"),
                  ("split", "sdpa", "cpu"), ("online", "sdpa", "torch")]


def scatter_free_list(pool: BlockPool, seed: int) -> None:
    """Shuffle the free list so that block tables are not 0, 1, 2, ... by accident."""
    order = list(pool.free_queue)
    random.Random(seed).shuffle(order)
    pool.free_queue = OrderedDict((b, None) for b in order)


# ---------------------------------------------------------------- attention


def paged_case(seqs, nkv, group, hd, block_size, seed, window=None, **cache_args):
    """A cache holding ``seqs`` [(tokens cached, tokens in this forward)], K/V written by ``update``
    as the engine writes them -> (cache, meta of the last forward, its q (1, nh, N, hd), K, V, Q)."""
    nh = nkv * group
    cfg = tiny_config(num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, hidden_size=nh * hd,
                      num_hidden_layers=1, sliding_window=window)
    gen = torch.Generator().manual_seed(seed)
    blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    cache = PagedKVCache(cfg, blocks, block_size, **cache_args)
    mgr = KVCacheManager(BlockPool(blocks, block_size, enable_prefix_caching=False))
    scatter_free_list(mgr.pool, seed)
    K = [torch.randn(1, nkv, c + n, hd, generator=gen) for c, n in seqs]     # every key of each sequence
    V = [torch.randn(1, nkv, c + n, hd, generator=gen) for c, n in seqs]
    Q = [torch.randn(1, nh, n, hd, generator=gen) for c, n in seqs]
    for i, (c, n) in enumerate(seqs):
        assert mgr.allocate(i, [0] * (c + n)) == 0
    views = []
    for chunks in ([(i, 0, c) for i, (c, n) in enumerate(seqs) if c > 0], [(i, c, n) for i, (c, n) in enumerate(seqs)]):
        if chunks:                       # one forward's update: K/V of [(seq, start, n)] written at their slots
            meta = batch_of(mgr, chunks)
            cache.set_batch(meta)
            k = torch.cat([K[i][:, :, s:s + n] for i, s, n in chunks], dim=2)     # (1, nkv, N, hd)
            v = torch.cat([V[i][:, :, s:s + n] for i, s, n in chunks], dim=2)
            views.append(cache.update(0, k, v, meta.positions))
    return cache, meta, views[-1], torch.cat(Q, dim=2), K, V, Q


def reference_of(cache, meta, q, window):
    """``paged_attention_reference`` over what the pool holds (dequantized) -> (1, nh, N, hd)."""
    k_pool, v_pool = cache.dequantized(0)
    out = paged_attention_reference(q[0].transpose(0, 1), k_pool, v_pool, meta.block_tables, meta.seq_lens,
                                    meta.query_lens, window=window)
    return out.transpose(0, 1)[None]


seq_lists = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 8)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(nkv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 3]), hd=st.sampled_from([4, 8]),
       block_size=st.sampled_from([1, 2, 3, 4, 16]), seqs=seq_lists, window=st.one_of(st.none(), st.integers(1, 8)),
       backend=st.sampled_from(PAGED_BACKENDS), kv_dtype=st.sampled_from(["auto", "auto", "int8", "fp8"]),
       seed=st.integers(0, 2**16))
def test_every_paged_backend_equals_the_reference(nkv, group, hd, block_size, seqs, window, backend, kv_dtype, seed):
    """seqs: (tokens already cached, tokens in this forward) per sequence: (0, n) is a prefill,
    (c, 1) a decode, (c, n) a chunk of a chunked prefill."""
    mode, dense, kernel = backend
    assume(kv_dtype == "auto" or (kernel == "torch" and STORAGE[kv_dtype] is not None))
    assume(kernel != "cpu" or cpu_paged_decode.available())
    cache, meta, view, q, K, V, Q = paged_case(seqs, nkv, group, hd, block_size, seed, attention=dense,
                                               attention_mode=mode, kv_cache_dtype=kv_dtype, decode_kernel=kernel)
    assert cache.decode_kernel == kernel
    out = cache.attend(0, q, view, meta.positions, window=window)
    ref = reference_of(cache, meta, q, window)
    assert out.shape == q.shape
    assert torch.allclose(out, ref, atol=1e-4), describe_diff(out, ref)


@settings(max_examples=30, deadline=None)
@given(nkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), block_size=st.sampled_from([1, 3, 4, 16]),
       cached=st.lists(st.integers(0, 30), min_size=1, max_size=5), window=st.one_of(st.none(), st.integers(1, 8)),
       dense=st.sampled_from(["sdpa", "reference"]), kv_dtype=st.sampled_from(["auto", "int8"]),
       seed=st.integers(0, 2**16))
def test_static_decode_plan_equals_the_reference(nkv, group, block_size, cached, window, dense, kv_dtype, seed):
    """The fixed-shape plan of captured decode steps (every block of each row, masked on the device)."""
    cache, meta, view, q, *_ = paged_case([(c, 1) for c in cached], nkv, group, 8, block_size, seed,
                                          window=window, attention=dense, kv_cache_dtype=kv_dtype)
    cache.set_static_batch(meta)
    out = cache.attend(0, q, view, meta.positions, window=window)
    ref = reference_of(cache, meta, q, window)
    assert torch.allclose(out, ref, atol=1e-4), describe_diff(out, ref)


@settings(max_examples=25, deadline=None)
@given(nkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), block_size=st.sampled_from([1, 2, 4]),
       seqs=seq_lists, window=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 2**16))
def test_the_reference_equals_contiguous_attention(nkv, group, block_size, seqs, window, seed):
    cache, meta, view, q, K, V, Q = paged_case(seqs, nkv, group, 4, block_size, seed)
    out, start = reference_of(cache, meta, q, window), 0
    for i, (c, n) in enumerate(seqs):
        ref = reference_attention(Q[i], K[i], V[i], torch.arange(c, c + n)[None], torch.arange(c + n)[None],
                                  window=window)
        ours = out[:, :, start:start + n]
        assert torch.allclose(ours, ref, atol=1e-5), f"sequence {i}: " + describe_diff(ours, ref)
        start += n


def test_cache_layout_and_sizes():
    cfg = tiny_config(num_hidden_layers=3, kv_share_group=2)            # 2 KV layers
    cache = PagedKVCache(cfg, 5, 4)
    assert cache.k.shape == (2, 5, 4, cfg.num_key_value_heads, cfg.head_dim)
    assert cache.nbytes() == 5 * PagedKVCache.bytes_per_block(cfg, 4)
    assert PagedKVCache.bytes_per_block(cfg, 4) == kv_cache_bytes(cfg, 4, 4)
    assert PagedKVCache.num_blocks_for_memory(cfg, 5.5 * cache.nbytes() / 5, 4) == 5


def test_bad_use_is_explained():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="attention_mode"):
        PagedKVCache(cfg, 4, 4, attention_mode="magic")
    cache = PagedKVCache(cfg, 4, 4)
    k = torch.zeros(1, cfg.num_key_value_heads, 2, cfg.head_dim)
    with pytest.raises(ValueError, match="set_batch"):
        cache.update(0, k, k, torch.arange(2)[None])
    mgr = KVCacheManager(BlockPool(4, 4))
    mgr.allocate("a", [1, 2])
    cache.set_batch(batch_of(mgr, [("a", 0, 2)]))
    with pytest.raises(ValueError, match="flattened batch"):
        cache.update(0, k, k, torch.arange(3)[None])


# ---------------------------------------------------------------- the real model


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_paged_equals_contiguous(smollm2_dir):
    from minfer.llm import LLM
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=2**26)
    prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    params = SamplingParams(max_tokens=6, **GREEDY)
    contiguous = list(generate_tokens(llm.model, prompt, params))
    for _ in range(2):                                   # the second run hits the prefix cache
        assert llm.generate(prompt, params)[0].token_ids == contiguous


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), nkv=st.sampled_from([1, 3]), group=st.sampled_from([1, 3]),
       hd=st.sampled_from([4, 8]), context=st.integers(1, 40), block_size=st.sampled_from([4, 16]),
       seed=st.integers(0, 2**16))
def test_bench_attentions_gather_path_equals_the_reference(batch, nkv, group, hd, context, block_size, seed):
    """``bench attention``'s "paged" row (gather through shuffled blocks, then SDPA) computes what the
    one reference computes, so the benchmark and lesson 08 time a correct path."""
    from minfer.bench.attention import paged_gather, shuffled_pool
    gen = torch.Generator().manual_seed(seed)
    nh = nkv * group
    q = torch.randn(batch, nh, 1, hd, generator=gen)                          # (B, nh, 1, hd)
    k, v = (torch.randn(batch, nkv, context, hd, generator=gen) for _ in range(2))
    kv, tables, rows = shuffled_pool(k, v, gen, block_size)
    got = paged_gather(q, kv, rows, context)[:, :, 0]                         # (B, nh, hd)
    lens = torch.full((batch,), context, dtype=torch.int32)
    want = paged_attention_reference(q[:, :, 0], kv[0], kv[1], tables, lens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
