"""The C++ paged decode-attention kernel (minfer/kernels/cpu_paged_decode.py) against the plain paths.

* On random pools (GQA, ragged lengths including 0, block sizes 1/16/32, windows) it equals
  ``paged_attention_reference``, the one reference of paged attention.
* Through the engine (``decode_kernel="cpu"``), greedy tokens equal the plain gather + SDPA
  path (``decode_kernel="torch"``) and the naive oracle on tiny random models, windows and
  cross-layer KV sharing included.
* Loading it leaves the process's float semantics alone (no flush-to-zero from -ffast-math).
Skipped, with the build error as the reason, where the kernel cannot be compiled.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import first_difference, paged_pool, tiny_config, tiny_configs, tiny_model

from minfer.kernels import cpu_paged_decode
from minfer.attention.paged import paged_attention_reference, resolve_decode_kernel
from minfer.kv.paged import PagedKVCache
from minfer.llm import LLM
from minfer.naive import naive_generate
from minfer.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_paged_decode.available(),
                                reason=f"the C++ kernel did not build: {cpu_paged_decode.why_unavailable()}")
kernel = cpu_paged_decode.cpu_paged_decode_attention


@settings(max_examples=25, deadline=None)
@given(S=st.integers(1, 5), nkv=st.integers(1, 3), g=st.sampled_from([1, 2, 3, 4]), hd=st.sampled_from([8, 12, 64]),
       bs=st.sampled_from([1, 16, 32]), data=st.data(), window=st.sampled_from([None, 1, 5]))
def test_kernel_matches_the_reference(S, nkv, g, hd, bs, data, window):
    lens = data.draw(st.lists(st.integers(0, 70), min_size=S, max_size=S), label="context_lens")
    q, k, v, tables, clens = paged_pool(S, nkv, g, hd, bs, lens, "cpu", torch.float32, seed=S * 7 + hd)
    out = kernel(q, k, v, tables, clens, window=window)
    ref = paged_attention_reference(q, k, v, tables, clens, window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(S=st.integers(1, 4), g=st.sampled_from([1, 3]), bs=st.sampled_from([1, 16]), data=st.data())
def test_bf16_pages_match_the_reference_on_the_same_values(S, g, bs, data):
    """bf16 q and pages: float32 arithmetic on the bf16 values, one rounding of the result to bf16."""
    lens = data.draw(st.lists(st.integers(0, 40), min_size=S, max_size=S), label="context_lens")
    q, k, v, tables, clens = paged_pool(S, 2, g, 64, bs, lens, "cpu", torch.bfloat16, seed=S + g)
    out = kernel(q, k, v, tables, clens)
    ref = paged_attention_reference(q.float(), k.float(), v.float(), tables, clens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=8e-3)   # bf16's eps is 2^-8


def test_a_deliberately_wrong_table_is_caught():
    """The comparison above can fail: one block replaced by an unused one gives a different answer.
    (Swapping two full blocks would not: without positions, attention ignores the keys' order.)"""
    q, k, v, tables, clens = paged_pool(2, 2, 3, 16, 4, [9, 12], "cpu", torch.float32, seed=3)
    ref = paged_attention_reference(q, k, v, tables, clens)
    wrong = tables.clone()
    wrong[0, 0] = min(set(range(k.shape[0])) - set(tables.flatten().tolist()))
    assert not torch.allclose(kernel(q, k, v, wrong, clens), ref, atol=1e-3)


def test_bad_inputs_are_named():
    q, k, v, tables, clens = paged_pool(2, 2, 2, 8, 4, [3, 4], "cpu", torch.float32, seed=1)
    with pytest.raises(ValueError, match="group"):
        kernel(q[:, :3], k, v, tables, clens)
    with pytest.raises(RuntimeError, match="context_lens"):
        kernel(q, k, v, tables, torch.tensor([3, 99]))
    bad = tables.clone()
    bad[1, 0] = 10_000
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernel(q, k, v, bad, clens)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(q.double(), k, v, tables, clens)


def test_loading_the_kernel_keeps_subnormal_floats():
    """-ffast-math is a compile flag only: linked in, GCC 12 would set flush-to-zero process-wide."""
    assert cpu_paged_decode.available()
    assert (torch.tensor([1e-39]) / 10).item() != 0.0


@settings(max_examples=15, deadline=None)
@given(cfg=tiny_configs(), seed=st.integers(0, 1000), num=st.integers(1, 6), max_new=st.integers(2, 8),
       block_size=st.sampled_from([1, 4, 16]))
def test_the_engine_on_the_kernel_equals_the_plain_path_and_the_oracle(cfg, seed, num, max_new, block_size):
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(num)]
    params = SamplingParams(max_tokens=max_new, temperature=0)
    args = dict(block_size=block_size, num_blocks=256, max_num_batched_tokens=24)   # chunked, mixed steps
    fast = LLM.from_model(model, decode_kernel="cpu", **args)
    plain = LLM.from_model(model, decode_kernel="torch", **args)
    assert fast.engine.runner.cache.decode_kernel == "cpu" and plain.engine.runner.cache.attn.kernel is None
    for p, a, b in zip(prompts, fast.generate(prompts, params), plain.generate(prompts, params)):
        assert a.token_ids == b.token_ids, first_difference(a.token_ids, b.token_ids)
        oracle = naive_generate(model.state_dict(), cfg, p, params)
        assert a.token_ids == oracle, first_difference(a.token_ids, oracle)


def test_auto_picks_the_kernel_only_where_it_applies():
    cfg = tiny_config()
    assert resolve_decode_kernel("auto", "cpu", torch.float32)[0] == "cpu"
    assert resolve_decode_kernel("auto", "cpu", torch.bfloat16)[0] == "cpu"
    assert resolve_decode_kernel("auto", "cpu", torch.float16)[0] == "torch"
    assert resolve_decode_kernel("auto", "cpu", torch.float32, kv_cache_dtype="int8")[0] == "torch"
    assert resolve_decode_kernel("auto", "cpu", torch.float32, attention_mode="online")[0] == "torch"
    assert LLM.from_model(tiny_model(cfg)).engine.runner.cache.decode_kernel == "cpu"
    with pytest.raises(ValueError, match="decode_kernel must be one of"):
        PagedKVCache(cfg, 4, decode_kernel="fast")
    with pytest.raises(ValueError, match="kv_cache_dtype='int8'"):
        PagedKVCache(cfg, 4, kv_cache_dtype="int8", decode_kernel="cpu")
    with pytest.raises(ValueError, match="decode_kernel must be one of"):
        LLM("no-such-model", decode_kernel="fast")


def test_a_stale_build_lock_is_removed(tmp_path):
    """A builder killed mid-build leaves torch's ``lock`` file; the next build must not wait on it forever."""
    from minfer.kernels.cpu_paged_decode import _build_lock

    (tmp_path / "lock").write_text("")
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_built_kernel_is_loaded_only_when_complete(tmp_path):
    """Later processes load the finished .so directly; without the marker, or damaged, it is built again."""
    from minfer.kernels.cpu_paged_decode import _load_built

    (tmp_path / "minfer_cpu_paged_decode.so").write_bytes(b"not an ELF file")
    assert _load_built(tmp_path) is None                     # no marker: a build may have been cut short
    (tmp_path / "minfer.built").write_text("")
    assert _load_built(tmp_path) is None                     # damaged: build again
