"""The paged engine on Gemma-shaped models (tiny, random): MQA, 5-local-1-global style patterns.

Whatever the batch, block size, token budget, prefix caching, preemption or
KV dtype, greedy tokens equal the single-request loop's and the naive
oracle's; n > 1 samples equal single runs with derived seeds. Windows are
shorter than the sequences, so the local layers really drop keys that the
global ones still read.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import first_difference, tiny_gemma_config, tiny_gemma_configs, tiny_model

from minfer.generate import generate_tokens
from minfer.kv import make_cache
from minfer.kv.coordinator import KVCacheCoordinator, kv_cache_groups
from minfer.llm import LLM
from minfer.naive import naive_generate
from minfer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0, ignore_eos=True)


def random_prompts(rng, vocab, num, shared_len):
    shared = [rng.randrange(vocab) for _ in range(shared_len)]
    return [shared[:rng.randint(0, shared_len)] + [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
            for _ in range(num)]


@settings(max_examples=6, deadline=None)
@given(cfg=tiny_gemma_configs(), seed=st.integers(0, 1000), num=st.integers(1, 4), shared=st.integers(0, 10),
       block_size=st.sampled_from([1, 2, 4]), budget=st.integers(2, 16), caching=st.booleans(),
       kv=st.sampled_from(["auto", "int8", "fp8"]), tight=st.booleans())
def test_engine_equals_loop_and_oracle(cfg, seed, num, shared, block_size, budget, caching, kv, tight):
    """Tight pools preempt; local groups drop blocks (windows of 1-6, sequences up to 26 tokens)."""
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = random_prompts(rng, cfg.vocab_size, num, shared)
    params = SamplingParams(max_tokens=8, **GREEDY)
    biggest = max(-(-(len(p) + 8) // block_size) for p in prompts) * len(kv_cache_groups(cfg))
    llm = LLM.from_model(model, block_size=block_size, max_num_batched_tokens=budget,
                         num_blocks=biggest + (1 if tight else 64), enable_prefix_caching=caching,
                         kv_cache_dtype=kv)
    outs = llm.generate(prompts, params)
    for p, out in zip(prompts, outs):
        loop_kind = "contiguous" if kv == "auto" else kv
        loop = list(generate_tokens(model, p, params, kv_cache=loop_kind))
        assert out.token_ids == loop, "engine vs loop: " + first_difference(out.token_ids, loop)
        if kv == "auto":
            oracle = naive_generate(model.state_dict(), cfg, p, params)
            assert out.token_ids == oracle, "engine vs oracle: " + first_difference(out.token_ids, oracle)
    pool = llm.engine.runner.kv_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(2, 3), prompt_len=st.integers(1, 9))
def test_parallel_samples_equal_single_runs(seed, n, prompt_len):
    cfg = tiny_gemma_config(num_hidden_layers=3, sliding_window=3)
    model = tiny_model(cfg, seed=seed)
    prompt = [random.Random(seed).randrange(cfg.vocab_size) for _ in range(prompt_len)]
    params = SamplingParams(temperature=1.0, max_tokens=6, n=n, seed=seed, ignore_eos=True)
    out = LLM.from_model(model, block_size=2, enable_prefix_caching=False).generate(prompt, params)[0]
    for i, o in enumerate(out.outputs):
        single = SamplingParams(temperature=1.0, max_tokens=6, seed=seed + i, ignore_eos=True)
        alone = LLM.from_model(model, block_size=2).generate(prompt, single)[0].token_ids
        assert o.token_ids == alone, f"sample {i}: " + first_difference(o.token_ids, alone)


@pytest.mark.parametrize("kind", ["contiguous", "static", "hybrid"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_single_request_caches_equal_the_oracle(kind, chunk):
    """The plain loop's caches: the static one keeps a mask per window (local and global), the hybrid
    one a ring of 3 slots for the local layers while the sequence grows to 17."""
    cfg = tiny_gemma_config(num_hidden_layers=4, sliding_window=3)
    model = tiny_model(cfg, seed=5)
    prompt = list(range(10, 19))
    params = SamplingParams(max_tokens=8, **GREEDY)
    got = list(generate_tokens(model, prompt, params, kv_cache=kind, prefill_chunk=chunk))
    assert got == naive_generate(model.state_dict(), cfg, prompt, params)


def test_hybrid_cache_bytes_for_gemma_3_270m():
    """The shape of Gemma 3 270M (no weights needed): at 8192 tokens the local layers hold 512 each."""
    from minfer.bench.hybrid import measure, measure_engine
    from minfer.config import ModelConfig, gemma3_layer_types
    cfg = ModelConfig(vocab_size=256, hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, intermediate_size=2048, sliding_window=512,
                      layer_types=gemma3_layer_types(18), max_position_embeddings=32768)
    rows = {r["context"]: r for r in measure(cfg, [512, 8192])}
    per_layer = 2 * 256 * 4                                      # K and V, one head of 256, float32
    assert rows[512]["full_B_per_token"] == rows[512]["hybrid_B_per_token"] == 18 * per_layer
    assert rows[8192]["hybrid_B_per_token"] == (3 + 15 * 512 / 8192) * per_layer == 8064
    assert rows[8192]["ratio"] == pytest.approx(18 / 3.9375)
    engine = measure_engine(cfg, [2048, 8192])       # the engine's blocks, block size 16, token budget 512
    assert [r["full_B_per_token"] for r in engine] == [18 * per_layer] * 2
    assert [r["hybrid_B_per_token"] for r in engine] == [(3 + 15 * 512 / n) * per_layer for n in (2048, 8192)]
    assert engine[1]["hybrid_peak_B_per_token"] == (3 + 15 * 1024 / 8192) * per_layer   # window + one chunk


def test_sliding_cache_refuses_a_hybrid_model():
    cfg = tiny_gemma_config()
    with pytest.raises(ValueError, match="global layers"):
        make_cache("sliding", cfg, 1, 32, dtype=None, device="cpu")


def test_static_decode_step_is_refused_for_a_hybrid_model():
    """The fixed-shape decode step masks all layers with one window: a local/global model runs eager."""
    model = tiny_model(tiny_gemma_config())
    with pytest.raises(ValueError, match="mixes local and global layers"):
        LLM.from_model(model, enforce_eager=False)
    assert LLM.from_model(model).generate([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))[0].token_ids


def test_kv_groups_of_gemma_3_270m():
    """18 layers, every 6th global: 6 groups of 3 layers (gcd(3, 15)), the global group first."""
    from minfer.config import gemma3_layer_types
    cfg = tiny_gemma_config(num_hidden_layers=18, layer_types=gemma3_layer_types(18), sliding_window=512)
    groups = kv_cache_groups(cfg)
    assert groups[0] == (None, [5, 11, 17])
    assert groups[1:] == [(512, [0, 1, 2]), (512, [3, 4, 6]), (512, [7, 8, 9]), (512, [10, 12, 13]),
                          (512, [14, 15, 16])]
    assert kv_cache_groups(tiny_gemma_config(layer_types=None)) == [(4, [0, 1, 2, 3])]   # all local: one group


@pytest.mark.parametrize("block_size,budget", [(4, 6), (2, 16), (3, 5)])
def test_local_groups_release_blocks_behind_the_window(block_size, budget):
    """Step by step, a local group holds at most the blocks of window - 1 + chunk positions; the global
    group holds every block; tokens equal the oracle's, and the pool is whole again at the end."""
    cfg = tiny_gemma_config(num_hidden_layers=6, sliding_window=5)              # layers 2, 5 global
    model = tiny_model(cfg, seed=3)
    prompt = [random.Random(1).randrange(cfg.vocab_size) for _ in range(23)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    llm = LLM.from_model(model, block_size=block_size, max_num_batched_tokens=budget, num_blocks=200)
    engine = llm.engine
    kv = engine.runner.kv_manager
    assert isinstance(kv, KVCacheCoordinator) and kv.windows == [None, 5, 5]
    rid = engine.add_request(prompt, params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        if rid not in kv.seqs:
            break
        held = [len(g.seqs[rid].block_table) - g.seqs[rid].num_dropped for g in kv.groups]
        assert held[0] == -(-kv.groups[0].num_tokens(rid) // block_size)
        for h in held[1:]:
            assert h <= -(-(5 - 1 + budget) // block_size) + 1
        assert engine.kv_cache_usage[0] == sum(held)
        steps += 1
    assert steps > 10 and sum(held) < len(kv.groups) * held[0]      # less than a full cache at the end
    out = engine.requests[rid].output_token_ids
    assert out == naive_generate(model.state_dict(), cfg, prompt, params)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_prefix_hits_past_the_window(kv_dtype):
    """A second prompt that shares 16 tokens (window 3) with the first reuses its cached blocks in
    every group, the local groups' freed-but-cached ones included, and still equals the oracle."""
    cfg = tiny_gemma_config(num_hidden_layers=3, sliding_window=3)
    model = tiny_model(cfg, seed=11)
    shared = list(range(20, 36))
    params = SamplingParams(max_tokens=6, **GREEDY)
    llm = LLM.from_model(model, block_size=4, num_blocks=64, kv_cache_dtype=kv_dtype)
    for tail in ([1, 2], [3, 4, 5]):
        out = llm.generate(shared + tail, params)[0].token_ids
        if kv_dtype == "auto":
            assert out == naive_generate(model.state_dict(), cfg, shared + tail, params)
        else:
            assert out == list(generate_tokens(model, shared + tail, params, kv_cache="int8"))
    queries, hits = llm.engine.prefix_cache_stats
    assert hits == 16, (queries, hits)


def test_cpu_decode_kernel_reads_the_local_groups():
    """The C++ decode kernel (when it builds) serves every group, dropped blocks masked by the window."""
    from minfer.kernels import cpu_paged_decode
    if not cpu_paged_decode.available():
        pytest.skip(f"the C++ decode kernel does not build here: {cpu_paged_decode.why_unavailable()}")
    cfg = tiny_gemma_config(num_hidden_layers=4, sliding_window=3)
    model = tiny_model(cfg, seed=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    params = SamplingParams(max_tokens=12, **GREEDY)
    llm = LLM.from_model(model, block_size=2, num_blocks=40, decode_kernel="cpu")
    assert all(a.decode_kernel == "cpu" for a in llm.engine.runner.cache.attns)
    for p, out in zip(prompts, llm.generate(prompts, params)):
        assert out.token_ids == naive_generate(model.state_dict(), cfg, p, params)


@pytest.mark.parametrize("num_blocks", [20, 24])
def test_preemption_with_kv_groups(num_blocks):
    """A pool too small for three requests at once: the newest are preempted and recomputed, every
    group's blocks come back, and the tokens still equal the oracle's."""
    cfg = tiny_gemma_config(num_hidden_layers=3, sliding_window=3)
    model = tiny_model(cfg, seed=8)
    prompts = [[(7 * i + j) % cfg.vocab_size for j in range(9)] for i in range(3)]
    params = SamplingParams(max_tokens=14, **GREEDY)
    llm = LLM.from_model(model, block_size=2, num_blocks=num_blocks, max_num_batched_tokens=4)
    reqs = llm.engine.generate(prompts, params)
    assert sum(r.num_preemptions for r in reqs) > 0
    for p, r in zip(prompts, reqs):
        assert r.output_token_ids == naive_generate(model.state_dict(), cfg, p, params)
    pool = llm.engine.runner.kv_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


@settings(max_examples=25, deadline=None)
@given(window=st.integers(1, 8), n=st.integers(1, 80))
def test_bench_hybrid_pool_fits_any_context(window, n):
    """``bench hybrid``'s bookkeeping engine admits every context, and the hybrid groups hold no
    more than one group of every layer does."""
    import dataclasses

    from minfer.bench.hybrid import engine_bytes_per_token
    cfg = tiny_gemma_config(sliding_window=window)
    full = dataclasses.replace(cfg, layer_types=None, sliding_window=None)
    hybrid, plain = engine_bytes_per_token(cfg, n), engine_bytes_per_token(full, n)
    assert 0 < hybrid["B_per_token"] <= plain["B_per_token"]
