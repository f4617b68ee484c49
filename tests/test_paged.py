"""The paged KV cache keeps the math: attention, generation, prefix caching, copy-on-write.

* Paged attention, both ways ("gather" and "online"), equals attention over
  contiguous K/V (fp32, atol 1e-4) for random batches of sequences mixing
  prefill, chunked prefill and decode, random block sizes (block tables
  deliberately scattered over the pool), MHA/GQA/MQA and sliding windows.
* Greedy generation through the paged cache gives the tokens of the
  contiguous cache and of the naive oracle, alone and in a flattened batch
  of several requests joining at different times.
* Prefix caching on gives the same tokens as off (and does hit).
* Forked children (n > 1) share blocks and still see their own tokens.
"""
from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import describe_diff, first_difference, tiny_config, tiny_configs, tiny_model

from minfer.attention import get_backend, reference_attention
from minfer.generate import generate_tokens
from minfer.kv import kv_cache_bytes
from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.kv.paged import PagedBatch, PagedKVCache
from minfer.kv.paged_generate import OutOfBlocks, generate_paged, generate_paged_n, make_paged, paged_forward
from minfer.naive import naive_forward, naive_generate
from minfer.sampling import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def scatter_free_list(pool: BlockPool, seed: int) -> None:
    """Shuffle the free list so that block tables are not 0, 1, 2, ... by accident."""
    order = list(pool.free_queue)
    random.Random(seed).shuffle(order)
    pool.free_queue = OrderedDict((b, None) for b in order)


# ---------------------------------------------------------------- attention


@settings(max_examples=60, deadline=None)
@given(nkv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 3]), hd=st.sampled_from([4, 8]),
       block_size=st.sampled_from([1, 2, 3, 4, 16]),
       seqs=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 8)), min_size=1, max_size=4),
       window=st.one_of(st.none(), st.integers(1, 8)), mode=st.sampled_from(["gather", "online"]),
       backend=st.sampled_from(["reference", "sdpa", "flash"]), seed=st.integers(0, 2**16))
def test_paged_attention_equals_contiguous(nkv, group, hd, block_size, seqs, window, mode, backend, seed):
    """seqs: (tokens already cached, tokens in this forward) per sequence: (0, n) is a prefill,
    (c, 1) a decode, (c, n) a chunk of a chunked prefill."""
    nh = nkv * group
    cfg = tiny_config(num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, hidden_size=nh * hd,
                      num_hidden_layers=1)
    gen = torch.Generator().manual_seed(seed)
    blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    cache = PagedKVCache(cfg, blocks, block_size, attention_mode=mode)
    mgr = KVCacheManager(BlockPool(blocks, block_size, enable_prefix_caching=False))
    scatter_free_list(mgr.pool, seed)
    K = [torch.randn(1, nkv, c + n, hd, generator=gen) for c, n in seqs]     # every key of each sequence
    V = [torch.randn(1, nkv, c + n, hd, generator=gen) for c, n in seqs]
    Q = [torch.randn(1, nh, n, hd, generator=gen) for c, n in seqs]
    for i, (c, n) in enumerate(seqs):
        assert mgr.allocate(i, [0] * (c + n)) == 0

    def write(chunks):           # one forward's update: K/V of [(seq, start, n)] written at their slots
        meta = PagedBatch.build(mgr, chunks)
        cache.set_batch(meta)
        k = torch.cat([K[i][:, :, s:s + n] for i, s, n in chunks], dim=2)     # (1, nkv, N, hd)
        v = torch.cat([V[i][:, :, s:s + n] for i, s, n in chunks], dim=2)
        cache.update(0, k, v, meta.positions)
        return meta

    history = [(i, 0, c) for i, (c, n) in enumerate(seqs) if c > 0]
    if history:
        write(history)
    meta = write([(i, c, n) for i, (c, n) in enumerate(seqs)])
    q = torch.cat(Q, dim=2)                                                     # (1, nh, N, hd)
    out = cache.attend(0, q, None, meta.positions, get_backend(backend), window=window)
    assert out.shape == q.shape
    start = 0
    for i, (c, n) in enumerate(seqs):
        ref = reference_attention(Q[i], K[i], V[i], torch.arange(c, c + n)[None],
                                  torch.arange(c + n)[None], window=window)
        ours = out[:, :, start:start + n]
        assert torch.allclose(ours, ref, atol=1e-4), f"sequence {i}: " + describe_diff(ours, ref)
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
    cache.set_batch(PagedBatch.build(mgr, [("a", 0, 2)]))
    with pytest.raises(ValueError, match="flattened batch"):
        cache.update(0, k, k, torch.arange(3)[None])


# ---------------------------------------------------------------- whole generations


@settings(max_examples=12, deadline=None)
@given(cfg=tiny_configs(), prompt_len=st.integers(1, 12), n=st.integers(1, 10),
       block_size=st.sampled_from([1, 2, 4, 16]), mode=st.sampled_from(["gather", "online"]),
       chunk=st.one_of(st.none(), st.integers(1, 5)), backend=st.sampled_from(["sdpa", "reference"]))
def test_greedy_paged_equals_contiguous_and_naive(cfg, prompt_len, n, block_size, mode, chunk, backend):
    model = tiny_model(cfg, seed=prompt_len)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(n)).tolist()
    params = SamplingParams(max_tokens=n, **GREEDY)
    ours = list(generate_paged(model, prompt, params, block_size=block_size, attention=backend,
                               attention_mode=mode, prefill_chunk=chunk))
    kind = "sliding" if cfg.sliding_window else "contiguous"
    contiguous = list(generate_tokens(model, prompt, params, kv_cache=kind, attention=backend))
    oracle = naive_generate(model.state_dict(), cfg, prompt, params)
    assert ours == contiguous, first_difference(ours, contiguous)
    assert ours == oracle, first_difference(ours, oracle)


def run_flattened(model, prompts, max_new, *, block_size, mode, caching, rng, num_blocks=None):
    """A toy scheduler: requests join at random steps; each step runs, in ONE forward, a random
    chunk of every joined prompt still prefilling and one decode token of every other request."""
    need = sum(-(-(len(p) + max_new) // block_size) for p in prompts)
    cache, mgr = make_paged(model, num_blocks or need + 2, block_size,
                            enable_prefix_caching=caching, attention_mode=mode)
    scatter_free_list(mgr.pool, rng.randrange(1000))
    join = sorted(rng.randrange(4) for _ in prompts)
    pos = {}                                   # request -> next position to compute
    out = {i: [] for i in range(len(prompts))}
    hits, step = 0, 0
    while any(len(o) < max_new for o in out.values()):
        for i, p in enumerate(prompts):
            if join[i] <= step and i not in pos:
                n0 = mgr.allocate(i, p)
                assert n0 is not None, "the pool was sized to fit every request"
                pos[i], hits = n0, hits + n0
        chunks = []
        for i in sorted(pos):
            if len(out[i]) == max_new:
                continue
            p = prompts[i]
            if pos[i] < len(p):                                   # (chunked) prefill
                n = rng.randint(1, len(p) - pos[i])
                chunks.append((i, pos[i], p[pos[i]:pos[i] + n]))
            else:                                                 # decode the last sampled token
                assert mgr.append_slots(i, 1)
                chunks.append((i, pos[i], [out[i][-1]]))
        if chunks:
            logits = paged_forward(model, cache, mgr, chunks)
            for row, (i, start, toks) in enumerate(chunks):
                pos[i] = start + len(toks)
                if pos[i] >= len(prompts[i]):                     # logits of the last token: sample
                    out[i].append(int(logits[row].argmax()))
                    if len(out[i]) == max_new:
                        mgr.free(i)
        step += 1
    assert mgr.pool.num_free_blocks == mgr.pool.num_blocks       # everything was given back
    return [out[i] for i in range(len(prompts))], hits


@settings(max_examples=10, deadline=None)
@given(cfg=tiny_configs(), data=st.data(), block_size=st.sampled_from([1, 2, 3, 4]),
       mode=st.sampled_from(["gather", "online"]), seed=st.integers(0, 1000))
def test_flattened_batch_with_shared_prefixes_equals_each_request_alone(cfg, data, block_size, mode, seed):
    """Several requests in one flattened batch, with and without prefix caching, give the tokens
    of each request run alone through the contiguous cache."""
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    shared = [rng.randrange(cfg.vocab_size) for _ in range(data.draw(st.integers(0, 9)))]
    prompts = [shared[:data.draw(st.integers(0, len(shared)))]
               + [rng.randrange(cfg.vocab_size) for _ in range(data.draw(st.integers(1, 5)))]
               for _ in range(data.draw(st.integers(1, 4)))]
    max_new = data.draw(st.integers(1, 6))
    params = SamplingParams(max_tokens=max_new, **GREEDY)
    kind = "sliding" if cfg.sliding_window else "contiguous"
    alone = [list(generate_tokens(model, p, params, kv_cache=kind)) for p in prompts]
    for caching in (False, True):
        batched, _ = run_flattened(model, prompts, max_new, block_size=block_size, mode=mode,
                                   caching=caching, rng=random.Random(seed))
        for i, (a, b) in enumerate(zip(batched, alone)):
            assert a == b, f"request {i}, prefix caching {caching}: " + first_difference(a, b)


@settings(max_examples=6, deadline=None)
@given(cfg=tiny_configs(), block_size=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000),
       prefix_len=st.integers(4, 16))
def test_prefix_caching_on_equals_off_and_hits(cfg, block_size, seed, prefix_len):
    """Requests sharing a system prompt, one after another through one pool: same tokens with the
    cache on or off; with it on, later requests skip the shared full blocks."""
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    system = [rng.randrange(cfg.vocab_size) for _ in range(prefix_len)]
    prompts = [system + [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 4))] for _ in range(3)]
    params = SamplingParams(max_tokens=4, **GREEDY)
    results = {}
    for caching in (False, True):
        cache, mgr = make_paged(model, 64, block_size, enable_prefix_caching=caching)
        results[caching] = [list(generate_paged(model, p, params, cache=cache, manager=mgr)) for p in prompts]
        if caching:
            assert len(mgr.pool.cached) > 0
            assert mgr.allocate("probe", prompts[1]) >= (prefix_len // block_size) * block_size
    assert results[True] == results[False]


# ---------------------------------------------------------------- copy-on-write


@settings(max_examples=8, deadline=None)
@given(cfg=tiny_configs(), prompt_len=st.integers(1, 9), block_size=st.sampled_from([2, 3, 4]),
       n=st.integers(2, 4), steps=st.integers(1, 5), seed=st.integers(0, 1000))
def test_forked_children_see_their_own_tokens(cfg, prompt_len, block_size, n, steps, seed):
    """Fork a prompt into n children that then decode DIFFERENT tokens in one batch: each child's
    logits equal the oracle on (prompt + its own tokens), so the shared partly filled block was
    copied before anyone wrote into it."""
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(cfg.vocab_size) for _ in range(prompt_len)]
    cache, mgr = make_paged(model, 64, block_size)
    mgr.allocate("p", prompt)
    paged_forward(model, cache, mgr, [("p", 0, prompt)])
    kids = [f"c{i}" for i in range(n)]
    for c in kids:
        mgr.fork("p", c)
    mgr.free("p")
    seqs = {c: list(prompt) for c in kids}
    copies = 0
    for _ in range(steps):
        chunks = []
        for c in kids:
            tok = rng.randrange(cfg.vocab_size)                    # each child its own token
            assert mgr.append_slots(c, 1)
            chunks.append((c, len(seqs[c]), [tok]))
            seqs[c].append(tok)
        copies += len(mgr._pending_copies)
        logits = paged_forward(model, cache, mgr, chunks)
        for row, c in enumerate(kids):
            ref = naive_forward(model.state_dict(), cfg, seqs[c])[-1]
            assert torch.allclose(logits[row], ref, atol=1e-4), f"{c}: " + describe_diff(logits[row], ref)
    if prompt_len % block_size:
        assert copies == n - 1, "every child but the last to write should have copied the shared block"


def test_parallel_sampling_n_children():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=3)
    prompt = list(range(1, 11))
    greedy = SamplingParams(max_tokens=8, n=3, **GREEDY)
    one = list(generate_tokens(model, prompt, SamplingParams(max_tokens=8, **GREEDY)))
    assert generate_paged_n(model, prompt, greedy, block_size=4) == [one] * 3
    sampled = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7, ignore_eos=True)
    outs = generate_paged_n(model, prompt, sampled, block_size=4)
    for i, o in enumerate(outs):     # child i is the request with seed 7 + i, run alone
        alone = SamplingParams(temperature=1.0, max_tokens=8, seed=7 + i, ignore_eos=True)
        assert o == list(generate_tokens(model, prompt, alone)), f"child {i}"
    assert len({tuple(o) for o in outs}) > 1


def test_out_of_blocks_in_the_driver_is_a_clear_error():
    model = tiny_model(tiny_config())
    cache, mgr = make_paged(model, 2, 2)
    with pytest.raises(OutOfBlocks, match="blocks"):
        list(generate_paged(model, list(range(6)), SamplingParams(max_tokens=2, **GREEDY), cache=cache, manager=mgr))
    with pytest.raises(OutOfBlocks, match="no free block"):
        list(generate_paged(model, [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY), cache=cache, manager=mgr))
    assert mgr.pool.num_free_blocks == 2 and not mgr.seqs                # nothing leaked


# ---------------------------------------------------------------- the real model


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_paged_equals_contiguous(smollm2_dir):
    from minfer.llm import LLM
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32")
    prompt = llm.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    params = SamplingParams(max_tokens=6, **GREEDY)
    contiguous = list(generate_tokens(llm.model, prompt, params))
    cache, mgr = make_paged(llm.model, 16, 16)
    for _ in range(2):                                   # the second run hits the prefix cache
        assert list(generate_paged(llm.model, prompt, params, cache=cache, manager=mgr)) == contiguous
