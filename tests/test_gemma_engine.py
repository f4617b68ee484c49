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
       kv=st.sampled_from(["auto", "int8"]), tight=st.booleans())
def test_engine_equals_loop_and_oracle(cfg, seed, num, shared, block_size, budget, caching, kv, tight):
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = random_prompts(rng, cfg.vocab_size, num, shared)
    params = SamplingParams(max_tokens=8, **GREEDY)
    biggest = max(-(-(len(p) + 8) // block_size) for p in prompts)
    llm = LLM.from_model(model, block_size=block_size, max_num_batched_tokens=budget,
                         num_blocks=biggest + (1 if tight else 64), enable_prefix_caching=caching,
                         kv_cache_dtype=kv)
    outs = llm.generate(prompts, params)
    for p, out in zip(prompts, outs):
        loop_kind = "int8" if kv == "int8" else "contiguous"
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
    from minfer.bench.hybrid import measure
    from minfer.config import ModelConfig, gemma3_layer_types
    cfg = ModelConfig(vocab_size=256, hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, intermediate_size=2048, sliding_window=512,
                      layer_types=gemma3_layer_types(18), max_position_embeddings=32768)
    rows = {r["context"]: r for r in measure(cfg, [512, 8192])}
    per_layer = 2 * 256 * 4                                      # K and V, one head of 256, float32
    assert rows[512]["full_B_per_token"] == rows[512]["hybrid_B_per_token"] == 18 * per_layer
    assert rows[8192]["hybrid_B_per_token"] == (3 + 15 * 512 / 8192) * per_layer == 8064
    assert rows[8192]["ratio"] == pytest.approx(18 / 3.9375)


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
