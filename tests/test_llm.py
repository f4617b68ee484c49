"""``LLM`` is the engine's front door: every property is checked through ``LLM.generate``.

* Greedy tokens equal the naive oracle's, whatever the arrival order, token
  budget, prefill chunk, block size, forced preemption (a pool too small for
  everyone) and shared prefixes; tiny random models with MHA/GQA/MQA, bias,
  sliding windows and cross-layer KV sharing.
* A seeded sampled request gives the same tokens alone as in a batch, with
  prefix caching on or off.
* n > 1: sample i equals the request with n = 1 and seed + i; the samples
  share the prompt's blocks until they diverge; the pool's free count
  returns to its start.
* The prefix cache lives as long as the LLM: a second call reuses blocks.
* int8/fp8 KV pages give the contiguous int8/fp8 cache's tokens and logits.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import describe_diff, first_difference, tiny_config, tiny_configs, tiny_model

from minfer.generate import generate_tokens
from minfer.llm import LLM
from minfer.naive import naive_forward, naive_generate
from minfer.sampling import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def prompts_with_shared_prefix(rng, vocab, num, shared_len):
    shared = [rng.randrange(vocab) for _ in range(shared_len)]
    return [shared[:rng.randint(0, shared_len)] + [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            for _ in range(num)]


@settings(max_examples=12, deadline=None)
@given(cfg=tiny_configs(), seed=st.integers(0, 1000), num=st.integers(1, 5), shared=st.integers(0, 12),
       max_new=st.integers(1, 6), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 24), chunk=st.one_of(st.none(), st.integers(1, 5)),
       tight=st.booleans(), caching=st.booleans())
def test_greedy_generate_equals_the_oracle(cfg, seed, num, shared, max_new, block_size, budget, chunk, tight,
                                           caching):
    """tight: a pool with room for little more than the largest request, so requests are preempted."""
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = prompts_with_shared_prefix(rng, cfg.vocab_size, num, shared)
    rng.shuffle(prompts)                                                   # arrival order
    params = SamplingParams(max_tokens=max_new, **GREEDY)
    biggest = max(-(-(len(p) + max_new) // block_size) for p in prompts)
    llm = LLM.from_model(model, max_num_batched_tokens=budget, max_prefill_chunk=chunk, block_size=block_size,
                         num_blocks=biggest + (1 if tight else 64), enable_prefix_caching=caching)
    outs = llm.generate(prompts, params)
    for p, out in zip(prompts, outs):
        oracle = naive_generate(model.state_dict(), cfg, p, params)
        assert out.token_ids == oracle, first_difference(out.token_ids, oracle)
        assert out.finish_reason == "length" and out.prompt_token_ids == p
    pool = llm.engine.runner.kv_manager.pool
    assert pool.num_free_blocks == pool.num_blocks                        # everything was given back


def test_preemption_happens_in_the_tight_pool():
    """The 'tight' case above really preempts (so the property covers preemption)."""
    cfg = tiny_config()
    llm = LLM.from_model(tiny_model(cfg), block_size=2, num_blocks=6, max_num_batched_tokens=64)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == naive_generate(llm.model.state_dict(), cfg, p, SamplingParams(max_tokens=6, **GREEDY))


@settings(max_examples=8, deadline=None)
@given(cfg=tiny_configs(), seed=st.integers(0, 1000), others=st.integers(0, 4), caching=st.booleans(),
       top_k=st.sampled_from([0, 5]))
def test_seeded_sampling_is_the_same_alone_and_in_a_batch(cfg, seed, others, caching, top_k):
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = prompts_with_shared_prefix(rng, cfg.vocab_size, others + 1, 8)
    params = SamplingParams(temperature=1.0, top_k=top_k, max_tokens=6, seed=seed, ignore_eos=True)
    alone = LLM.from_model(model, block_size=2).generate(prompts[0], params)[0].token_ids
    single = list(generate_tokens(model, prompts[0], params, kv_cache="sliding" if cfg.sliding_window else "contiguous"))
    assert alone == single, first_difference(alone, single)
    llm = LLM.from_model(model, block_size=2, enable_prefix_caching=caching, max_num_batched_tokens=7)
    llm.generate(prompts[1:] or prompts[0], SamplingParams(max_tokens=3, **GREEDY))     # warm the prefix cache
    batch = [SamplingParams(temperature=0.8, max_tokens=5, seed=i, ignore_eos=True) for i in range(others)]
    got = llm.generate(prompts, [params] + batch)[0].token_ids
    assert got == alone, first_difference(got, alone)


@settings(max_examples=8, deadline=None)
@given(cfg=tiny_configs(), seed=st.integers(0, 1000), n=st.integers(2, 4), prompt_len=st.integers(1, 9),
       block_size=st.sampled_from([2, 3, 4]), temperature=st.sampled_from([0.0, 1.0]))
def test_parallel_samples_equal_single_runs_with_derived_seeds(cfg, seed, n, prompt_len, block_size, temperature):
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(cfg.vocab_size) for _ in range(prompt_len)]
    params = SamplingParams(temperature=temperature, max_tokens=5, n=n, seed=seed, ignore_eos=True)
    llm = LLM.from_model(model, block_size=block_size, enable_prefix_caching=False)
    pool = llm.engine.runner.kv_manager.pool
    free0 = pool.num_free_blocks
    shared_seen = []
    engine = llm.engine

    def watch_step(step=engine.step):        # after each step: blocks the running samples share
        out = step()
        tables = [engine.runner.kv_manager.block_table(r.request_id) for r in engine.scheduler.running]
        if len(tables) > 1:
            shared_seen.append(set(tables[0]).intersection(*tables[1:]))
        return out

    engine.step = watch_step
    out = llm.generate(prompt, params)[0]
    assert [o.index for o in out.outputs] == list(range(n))
    for i, o in enumerate(out.outputs):
        single = SamplingParams(temperature=temperature, max_tokens=5, seed=seed + i, ignore_eos=True)
        alone = LLM.from_model(model, block_size=block_size).generate(prompt, single)[0].token_ids
        assert o.token_ids == alone, f"sample {i}: " + first_difference(o.token_ids, alone)
    assert out.text == out.outputs[0].text and out.token_ids == out.outputs[0].token_ids
    if prompt_len >= block_size:                   # a full prompt block is shared by every sample
        assert shared_seen and all(shared_seen[0] & s for s in shared_seen[:1])
    assert pool.num_free_blocks == free0


@pytest.mark.parametrize("prompt_len", [6, 8])
def test_forked_samples_see_their_own_context(prompt_len):
    """Every sample's logits at every step equal the oracle's on (prompt + that sample's tokens): the
    shared, partly filled block was copied before a sample wrote into it (copy-on-write)."""
    cfg = tiny_config()
    model = tiny_model(cfg, seed=3)
    llm = LLM.from_model(model, block_size=4, enable_prefix_caching=False)
    runner, checked = llm.engine.runner, []
    execute = runner.execute

    def watch(chunks, rows):
        logits = execute(chunks, rows)
        for k, i in enumerate(rows):
            c = chunks[i]
            ref = naive_forward(model.state_dict(), cfg, c.request.all_token_ids[:c.start + c.num_tokens])[-1]
            assert torch.allclose(logits[k], ref, atol=1e-4), f"sample {c.request.index}: " + describe_diff(logits[k], ref)
            checked.append(c.request.index)
        return logits

    runner.execute = watch
    out = llm.generate(list(range(1, prompt_len + 1)),
                       SamplingParams(temperature=1.0, max_tokens=6, n=3, seed=1, ignore_eos=True))[0]
    assert set(checked) == {0, 1, 2} and len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_prefix_cache_lives_as_long_as_the_llm():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=1)
    system = list(range(1, 33))
    llm = LLM.from_model(model, block_size=4)
    params = SamplingParams(max_tokens=4, **GREEDY)
    llm.generate(system + [40, 41], params)
    mgr = llm.engine.runner.kv_manager
    assert mgr.allocate("probe", system + [50]) == 32         # all 8 full blocks of the prefix are cached
    mgr.free("probe")
    second = llm.generate(system + [50], params)[0].token_ids
    off = LLM.from_model(model, block_size=4, enable_prefix_caching=False).generate(system + [50], params)[0]
    assert second == off.token_ids


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_pages_equal_the_contiguous_quantized_cache(fmt):
    cfg = tiny_config(num_key_value_heads=1)
    model = tiny_model(cfg, seed=5)
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(3, 12))] for _ in range(3)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    llm = LLM.from_model(model, block_size=4, kv_cache_dtype=fmt, max_num_batched_tokens=5)
    for p, out in zip(prompts, llm.generate(prompts, params)):
        contiguous = list(generate_tokens(model, p, params, kv_cache=fmt))
        assert out.token_ids == contiguous, first_difference(out.token_ids, contiguous)
    assert llm.engine.runner.cache.k.dtype != torch.float32


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_pages_give_the_contiguous_quantized_caches_logits(fmt):
    """Logits, not only tokens: every row the engine samples from (chunked prefill, batched decode)
    equals the contiguous int8/fp8 cache's logits on the same context (one scale per token and head
    in both, so the stored values are the same)."""
    from minfer.generate import forward_tokens
    from minfer.kv import make_cache
    cfg = tiny_config(num_key_value_heads=1)
    model = tiny_model(cfg, seed=5)
    rng = random.Random(1)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(3, 12))] for _ in range(3)]
    llm = LLM.from_model(model, block_size=4, kv_cache_dtype=fmt, max_num_batched_tokens=5)
    runner, checked = llm.engine.runner, []
    execute = runner.execute

    def watch(chunks, rows):
        logits = execute(chunks, rows)
        for k, i in enumerate(rows):
            ctx = chunks[i].request.all_token_ids[:chunks[i].start + chunks[i].num_tokens]
            cache = make_cache(fmt, cfg, 1, len(ctx), dtype=torch.float32, device="cpu")
            ref = forward_tokens(model, cache, ctx, 0, last_only=True)[-1]
            assert torch.allclose(logits[k], ref, atol=1e-4), describe_diff(logits[k], ref)
            checked.append(len(ctx))
        return logits

    runner.execute = watch
    llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))
    assert len(checked) == 3 * 6


def test_stop_strings_and_streaming_through_the_engine(tokenizer_llm=None):
    """Text deltas add up to the final text; nothing after a stop string is streamed."""
    from minfer.engine.output import TextOutput

    class Chars:                                # a tokenizer whose token i is chr(97 + i % 26)
        eos_token_ids = []

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    out, streamed = TextOutput(Chars(), ["cd"]), ""
    for tok in [0, 1, 2, 3, 4]:                 # a b c d e
        new, hit = out.add(tok)
        streamed += new
        if hit:
            break
    assert hit and out.text == "ab" and streamed == "ab" and out.cut
    out = TextOutput(Chars(), ["xyz"])
    streamed = "".join(out.add(t)[0] for t in [0, 1, 2, 3]) + out.finish()
    assert streamed == out.text == "abcd"


def test_bad_engine_arguments_are_explained():
    model = tiny_model(tiny_config())
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM.from_model(model, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="num_blocks"):
        LLM.from_model(model, num_blocks=1, block_size=1).generate([1, 2, 3], SamplingParams(max_tokens=4))


@pytest.mark.parametrize("window,block_size", [(4, 2), (5, 4), (3, 1)])
def test_sliding_window_gives_blocks_back(window, block_size):
    """Blocks wholly outside the window return to the pool while the request runs; tokens stay the oracle's."""
    cfg = tiny_config(sliding_window=window)
    model = tiny_model(cfg, seed=2)
    prompt = list(range(3, 17))
    params = SamplingParams(max_tokens=20, **GREEDY)
    llm = LLM.from_model(model, block_size=block_size, max_num_batched_tokens=5)
    engine, held = llm.engine, []
    step = engine.step

    def watch():
        out = step()
        held.append(engine.runner.kv_manager.usage().num_used_blocks)
        return out

    engine.step = watch
    out = llm.generate(prompt, params)[0]
    assert out.token_ids == naive_generate(model.state_dict(), cfg, prompt, params)
    # the window, the block being written, and a partly visible one at most (plus a chunk's worth)
    assert max(held[-10:]) <= -(-window // block_size) + 2, held
    pool = engine.runner.kv_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
