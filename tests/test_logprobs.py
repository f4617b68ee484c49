"""Log-probabilities (``SamplingParams.logprobs`` / ``prompt_logprobs``, ``minfer/logprobs.py``) equal the
log-softmax of the oracle's logits (``minfer/naive.py``, fp32, atol 1e-4):

* sampled tokens' and prompt tokens' entries, their ranks and the top k, through ``LLM.generate``;
* whatever the token budget, prefill chunk, block size, preemption (a tight pool) and prefix cache
  (a request that shares a cached prefix still gets every prompt row: it does not read the cache);
* "processed_logprobs": the distribution the token was drawn from (temperature, top-k, top-p);
* parallel samples (n > 1) each get their own; speculative decoding refuses them with a clear error;
* a batch in which nobody asks computes no logprobs at all.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_config, tiny_configs, tiny_model

from minfer import logprobs as lp_module
from minfer.llm import LLM
from minfer.naive import naive_forward
from minfer.sampling import SamplingParams, top_k_filter, top_p_filter

ATOL = 1e-4


def check_entry(d: dict, tok: int, ref: torch.Tensor, k: int) -> None:
    """One {token_id: Logprob} dict against the reference log-probabilities ref (V,)."""
    assert list(d)[0] == tok                                              # the token's entry comes first
    assert abs(d[tok].logprob - ref[tok].item()) < ATOL
    assert d[tok].rank == int((ref > ref[tok]).sum()) + 1
    top = ref.topk(k).indices.tolist() if k else []
    assert set(d) == set(top) | {tok}
    for rank, t in enumerate(top, 1):
        assert d[t].rank == rank and abs(d[t].logprob - ref[t].item()) < ATOL


def check_output(model, out, k: int, pk: int | None) -> None:
    seq = out.prompt_token_ids + out.token_ids
    ref = torch.log_softmax(naive_forward(model.state_dict(), model.cfg, seq), dim=-1)   # (T, V)
    P = len(out.prompt_token_ids)
    assert len(out.outputs[0].logprobs) == len(out.token_ids)
    for j, (tok, d) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        check_entry(d, tok, ref[P - 1 + j], k)
    if pk is None:
        assert out.prompt_logprobs is None
        return
    assert len(out.prompt_logprobs) == P and out.prompt_logprobs[0] is None
    for i in range(1, P):
        check_entry(out.prompt_logprobs[i], seq[i], ref[i - 1], pk)


@settings(max_examples=10, deadline=None)
@given(cfg=tiny_configs(sharing=False), seed=st.integers(0, 1000), num=st.integers(1, 4),
       block_size=st.sampled_from([1, 2, 4]), budget=st.integers(2, 16), chunk=st.one_of(st.none(), st.integers(1, 5)),
       tight=st.booleans(), caching=st.booleans(), k=st.integers(0, 4), pk=st.sampled_from([None, 0, 3]),
       temperature=st.sampled_from([0.0, 0.8]))
def test_logprobs_equal_the_oracles_log_softmax(cfg, seed, num, block_size, budget, chunk, tight, caching, k, pk,
                                                temperature):
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    shared = [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(0, 9))]
    prompts = [shared + [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 5))] for _ in range(num)]
    biggest = max(-(-(len(p) + 4) // block_size) for p in prompts)
    llm = LLM.from_model(model, max_num_batched_tokens=budget, max_prefill_chunk=chunk, block_size=block_size,
                         num_blocks=biggest + (1 if tight else 64), enable_prefix_caching=caching)
    if caching:                                            # the shared prefix is in the cache before they come
        llm.generate(shared + [0], SamplingParams(max_tokens=1, temperature=0))
    params = SamplingParams(max_tokens=4, temperature=temperature, seed=seed, ignore_eos=True, logprobs=k,
                            prompt_logprobs=pk)
    for out in llm.generate(prompts, params):
        check_output(model, out, k, pk)


def test_prompt_logprobs_skip_the_prefix_cache_and_preemption_recomputes_nothing_twice():
    """A cached prefix has K/V but no logits: a prompt_logprobs request does not read the cache (vLLM's rule),
    a request without them still does; a preempted request's prompt logprobs are not doubled."""
    cfg = tiny_config()
    model = tiny_model(cfg, seed=3)
    llm = LLM.from_model(model, block_size=2, num_blocks=64)
    prompt = list(range(1, 12))
    llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
    hits = llm.engine.prefix_cache_stats[1]
    out = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, logprobs=1))[0]
    assert llm.engine.prefix_cache_stats[1] == hits                     # not read
    check_output(model, out, 1, 2)
    llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=1))
    assert llm.engine.prefix_cache_stats[1] > hits                      # logprobs alone still use it
    tight = LLM.from_model(model, block_size=2, num_blocks=8, max_num_batched_tokens=64)
    outs = tight.generate([[1, 2, 3, 4], [5, 6, 7], [8, 9]],
                          SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1))
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for o in outs:
        check_output(model, o, 2, 1)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), temperature=st.sampled_from([0.0, 0.5, 1.3]), top_k=st.sampled_from([0, 3]),
       top_p=st.sampled_from([1.0, 0.7]))
def test_processed_logprobs_are_of_the_distribution_sampled_from(seed, temperature, top_k, top_p):
    cfg = tiny_config()
    model = tiny_model(cfg, seed=seed)
    llm = LLM.from_model(model, logprobs_mode="processed_logprobs")
    prompt = [3, 1, 4, 1, 5]
    out = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p,
                                              seed=seed, ignore_eos=True, logprobs=2))[0]
    logits = naive_forward(model.state_dict(), cfg, prompt + out.token_ids)[len(prompt) - 1:-1]   # (4, V)
    for x, tok, d in zip(logits, out.token_ids, out.outputs[0].logprobs):
        if temperature > 0:                                   # greedy rows report the raw distribution, as vLLM
            x = top_p_filter(top_k_filter(x / temperature, top_k), top_p)
        ref = torch.log_softmax(x, dim=-1)
        assert torch.isfinite(ref[tok]) and abs(d[tok].logprob - ref[tok].item()) < ATOL
        assert {t for t in d if t != tok} <= set(ref.topk(2).indices.tolist())


def test_nobody_asks_nothing_is_computed(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("logprobs were computed for a batch in which nobody asked")
    monkeypatch.setattr(lp_module, "logprob_dicts", refuse)
    llm = LLM.from_model(tiny_model(tiny_config()))
    out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, temperature=0.7, seed=1))
    assert all(o.outputs[0].logprobs is None and o.prompt_logprobs is None for o in out)


def test_parallel_samples_each_get_their_own_logprobs():
    model = tiny_model(tiny_config(), seed=5)
    out = LLM.from_model(model, block_size=2).generate([1, 2, 3, 4, 5], SamplingParams(
        n=3, temperature=1.0, seed=5, max_tokens=4, logprobs=1, prompt_logprobs=1, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        check_output(model, type(out)(out.prompt, out.prompt_token_ids, [c], prompt_logprobs=out.prompt_logprobs),
                     1, 1)


def test_speculative_decoding_refuses_logprobs():
    llm = LLM.from_model(tiny_model(tiny_config()), speculative="prompt_lookup")
    with pytest.raises(ValueError, match="speculative"):
        llm.generate([1, 2, 3], SamplingParams(prompt_logprobs=0))
    with pytest.raises(ValueError, match="speculative"):       # the engine itself, used without LLM
        llm.engine.add_request([1, 2, 3], SamplingParams(logprobs=1))


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_bad_logprobs_are_refused_naming_the_field(field):
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**{field: bad})
    with pytest.raises(ValueError, match="logprobs_mode"):
        LLM.from_model(tiny_model(tiny_config()), logprobs_mode="raw")
