"""The fused decoder layer (``kernels/cpu_fused_layer``) equals the plain one, in float32 and a8.

The oracle is ``DecoderLayer.forward`` on the same linears: float32 ``nn.Linear`` / ``PackedLinear``,
or the int8-activation ones (their C++ kernel, itself tested equal to its reference in
test_quant_a8.py). The fused layer computes the same values; only float summation order differs
(norm sums, FMAs, the GEMV's), which in a8 can move one activation across an int8 rounding
boundary: one step of that block (max / 127) times a weight, up to a few 1e-4 here. Such a tie
goes away 1e-5 from the input, so an a8 comparison that misses 1e-4 runs once more there
(``_off_a_tie``) and must then hold. (1e-6 is too small a step: an attention output that lay
1e-5 of a rounding step from its boundary stayed there for two of three draws 1e-6 away.) float32: DESIGN.md's 1e-4, no retry.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_config, tiny_gemma_config

from minfer.attention import get_backend
from minfer.kernels import cpu_fused_layer as fl
from minfer.kv.contiguous import ContiguousKVCache
from minfer.model import build_model, rope_cos_sin
from minfer.quant.apply import quantize_model

FORMATS = ["fp32", "int8", "int4-g32", "int4-g64", "q4_0", "q4_1", "q8_0"]
needs_kernel = pytest.mark.skipif(fl.why_unavailable() is not None, reason=f"fused layer: {fl.why_unavailable()}")


def _model(fmt: str, nkv: int = 2, group: int = 2, hd: int = 16, seed: int = 0, **kw):
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_key_value_heads=nkv,
                      num_attention_heads=nkv * group, head_dim=hd, **kw)
    if fmt != "fp32":
        return quantize_model(build_model(cfg, seed=seed), fmt + "-a8")
    model = build_model(cfg, seed=seed)
    assert fl.prepare_fused_layers(model) is None
    return model


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FORMATS), nkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       B=st.integers(1, 2), T=st.integers(1, 5), start=st.integers(0, 40),
       seed=st.integers(0, 2**16))
def test_fused_layer_equals_plain_layer(fmt, nkv, group, B, T, start, seed):
    hd = 64 // (nkv * group)                             # o_proj's inputs: 64, whole groups of every format
    model = _model(fmt, nkv, group, hd, seed=seed)
    layer = model.model.layers[1]
    assert layer.fused is not None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 64, generator=gen)
    positions = start + torch.arange(T).repeat(B, 1) + torch.arange(B)[:, None]       # (B, T)
    cos, sin = rope_cos_sin(model.inv_freq, positions)
    S = start + T + B                                    # earlier keys and values, already cached
    old_k, old_v = torch.randn(2, B, nkv, S, hd, generator=gen)
    fused = layer.fused

    def run(x):
        outs = []
        for layer.fused in (fused, None):
            cache = ContiguousKVCache(model.cfg, B, 64)
            cache.update(1, old_k, old_v, torch.arange(S).repeat(B, 1))
            outs.append(layer(x, cos, sin, positions, cache, None, get_backend("sdpa"))[0])
        return (outs,)

    (outs,) = _off_a_tie(run, x, fmt, gen)
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=0), (outs[0] - outs[1]).abs().max()


def _off_a_tie(run, x, fmt, gen):
    """``run(x)``; in a8, if its two outputs differ past 1e-4, ``run`` again 1e-5 away from x. A
    rounding tie (the module docstring) moves with so small a step; a real difference does not."""
    got = run(x)
    if fmt != "fp32" and not torch.allclose(got[0][0], got[0][1], atol=1e-4, rtol=0):
        got = run(x + 1e-5 * torch.randn(x.shape, generator=gen))
    return got


def _layer_step(layer, x, positions, cache, model, backend="sdpa"):
    cos, sin = rope_cos_sin(model.inv_freq, positions)
    return layer(x, cos, sin, positions, cache, None, get_backend(backend) if isinstance(backend, str) else backend)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(["fp32", "int8"]), nkv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 3, 4]),
       B=st.integers(1, 2), T=st.integers(1, 3), slack=st.integers(0, 2), window=st.sampled_from([None, 1, 3, 16]),
       seed=st.integers(0, 2**16))
def test_attention_in_the_call_equals_update_and_attend(fmt, nkv, group, B, T, slack, window, seed):
    """``attn_cached`` (KV write and attention in the C++ call, over a ContiguousKVCache) equals the cache's
    update + attend: the layer's output and every slot of the cache after, GQA, windows, the last slot."""
    fmt = fmt if 64 % (nkv * group) == 0 else "fp32"
    hd, max_len = (16 if fmt == "fp32" else 64 // (nkv * group)), 20       # a8: o_proj's 64 inputs
    model = _model(fmt, nkv, group, hd, seed=seed, sliding_window=window)
    layer = model.model.layers[1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 64, generator=gen)
    positions = max_len - T - slack - torch.arange(B)[:, None] * 5 + torch.arange(T)   # (B, T), up to the last slot
    old_k, old_v = torch.randn(2, B, nkv, max_len, hd, generator=gen)
    fused = layer.fused

    def run(x):
        outs, caches = [], []
        for layer.fused in (fused, None):
            cache = ContiguousKVCache(model.cfg, B, max_len)
            cache.update(1, old_k, old_v, torch.arange(max_len).repeat(B, 1))
            out, view = _layer_step(layer, x, positions, cache, model)
            assert (view is None) == (layer.fused is not None)    # the fused layer took the in-place path
            outs.append(out), caches.append(cache)
        return outs, caches

    outs, caches = _off_a_tie(run, x, fmt, gen)
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=0), (outs[0] - outs[1]).abs().max()
    assert torch.allclose(caches[0].k, caches[1].k, atol=1e-5) and torch.allclose(caches[0].v, caches[1].v, atol=1e-5)
    assert torch.equal(caches[0].lengths, caches[1].lengths)


@needs_kernel
@pytest.mark.parametrize("window", [None, 700])
def test_attention_in_the_call_over_threads_equals_update_and_attend(window):
    """A long context (keys x heads >= 2^13) splits the (row, K/V head) items over the threads."""
    model, threads = _model("fp32", nkv=2, group=4, hd=8, sliding_window=window), torch.get_num_threads()
    layer, gen = model.model.layers[0], torch.Generator().manual_seed(0)
    x, positions = torch.randn(2, 2, 64, generator=gen), torch.tensor([[1100, 1101], [1040, 1041]])
    old = torch.randn(2, 2, 2, 1102, 8, generator=gen)
    outs = []
    try:
        torch.set_num_threads(2)
        for fused in (layer.fused, None):
            layer.fused, cache = fused, ContiguousKVCache(model.cfg, 2, 1102)
            cache.update(0, old[0], old[1], torch.arange(1102).repeat(2, 1))
            outs.append(_layer_step(layer, x, positions, cache, model))
    finally:
        torch.set_num_threads(threads)
    assert outs[0][1] is None and torch.allclose(outs[0][0], outs[1][0], atol=1e-4, rtol=0)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(["fp32", "int8"]), nkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       lens=st.lists(st.integers(1, 13), min_size=1, max_size=2), bs=st.sampled_from([1, 4, 5]),
       window=st.sampled_from([None, 2, 6]), seed=st.integers(0, 2**16))
def test_paged_attention_in_the_call_equals_update_and_attend(fmt, nkv, group, lens, bs, window, seed):
    """``attn_paged`` (a batch of decodes over the paged pool, blocks in shuffled order, contexts ending
    on and across block boundaries) equals the cache's update + attend: output and pool."""
    from minfer.kv.paged import PagedBatch, PagedKVCache
    hd = 64 // (nkv * group)
    model = _model(fmt, nkv, group, hd, seed=seed, sliding_window=window)
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(seed)
    S, nblk = len(lens), -(-13 // bs)
    tables = torch.randperm(S * nblk, generator=gen).view(S, nblk)                 # (S, blocks)
    seq_lens = torch.tensor(lens)
    positions = (seq_lens - 1)[None]                                                # (1, S)
    slots = tables.gather(1, (seq_lens - 1)[:, None] // bs)[:, 0] * bs + (seq_lens - 1) % bs
    meta = PagedBatch(torch.ones(S, dtype=torch.long), seq_lens, tables, slots, torch.arange(S), positions)
    pool, x = torch.randn(1, 2, S * nblk, bs, nkv, hd, generator=gen), torch.randn(1, S, 64, generator=gen)
    outs, caches = [], []
    for fused in (layer.fused, None):
        layer.fused, cache = fused, PagedKVCache(model.cfg, S * nblk, bs)
        cache.kv.copy_(pool.expand_as(cache.kv))
        cache.set_batch(meta)
        out, view = _layer_step(layer, x, positions, cache, model)
        assert (view is None) == (fused is not None)
        outs.append(out), caches.append(cache)
    assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=0), (outs[0] - outs[1]).abs().max()
    assert torch.allclose(caches[0].kv, caches[1].kv, atol=1e-5)


@needs_kernel
def test_attention_in_the_call_only_where_it_is_the_plain_answer():
    """Other caches, many rows, a backend of its own: the cache's update + attend."""
    from minfer.kv import SlidingWindowKVCache, StaticKVCache
    model = _model("fp32")
    layer, cfg = model.model.layers[0], model.cfg
    one = torch.zeros(1, 1, dtype=torch.long)
    for cache, T, backend in ((StaticKVCache(cfg, 1, 16), 1, "sdpa"), (SlidingWindowKVCache(cfg, 1, 4), 1, "sdpa"),
                              (ContiguousKVCache(cfg, 1, 16), 9, "sdpa"),
                              (ContiguousKVCache(cfg, 1, 16), 1, lambda *a, **k: get_backend("sdpa")(*a, **k))):
        x = torch.randn(1, T, 64)
        assert _layer_step(layer, x, one + torch.arange(T), cache, model, backend)[1] is not None


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4-g32"])
def test_generate_tokens_greedy_equal_fused_and_plain(fmt):
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    model = _model(fmt, vocab_size=97)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [5, 17, 3, 60, 2]
    assert fl.prepare_fused_layers(model) is None
    fused = list(generate_tokens(model, prompt, params))
    assert fl.prepare_fused_layers(model, enabled=False) == "switched off"
    assert fused == list(generate_tokens(model, prompt, params))


@needs_kernel
@pytest.mark.parametrize("quantization", [None, "int4-a8"])
def test_engine_equal_fused_and_plain(tmp_path, quantization):
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams
    cfg = tiny_config(vocab_size=260, hidden_size=64, intermediate_size=128)
    folder = save_hf_folder(tmp_path / "m", cfg, build_model(cfg, seed=1).state_dict(), *tiny_tokenizer())
    llm = LLM(str(folder), quantization=quantization)       # float32: fused by default on the CPU
    assert all(layer.fused is not None for layer in llm.model.model.layers) and llm.model.fused_head
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["hello", "a longer prompt here", "x"]
    fused = [o.token_ids for o in llm.generate(prompts, params)]
    fl.prepare_fused_layers(llm.model, enabled=False)
    assert fused == [o.token_ids for o in llm.generate(prompts, params)]


def test_layers_that_cannot_fuse_say_why(monkeypatch):
    gemma = quantize_model(build_model(tiny_gemma_config(hidden_size=64, num_attention_heads=4), seed=0),
                           "int8-a8")
    assert "Llama" in fl.prepare_fused_layers(gemma) and all(lay.fused is None for lay in gemma.model.layers)
    weight_only = quantize_model(build_model(tiny_config(), seed=0), "int8")
    assert "int8-activation" in fl.why_not(weight_only.model.layers[0])
    assert "stacked" in fl.why_not(build_model(tiny_config(), seed=0, fuse_projections=False).model.layers[0])
    padded = quantize_model(build_model(tiny_config(), seed=0), "int8-a8")  # intermediate 48: padded
    assert "pads" in fl.prepare_fused_layers(padded)
    monkeypatch.setattr(fl, "_state", {"why": "this CPU lacks AVX2 (and AVX-512 VNNI)"})
    model = _model("int4-g32")                                   # quantize_model still runs: plain layers
    assert all(layer.fused is None for layer in model.model.layers)
    assert "AVX2" in fl.prepare_fused_layers(model)
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids, torch.arange(3)[None]).shape == (1, 3, 97)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 3), n=st.integers(1, 300), k=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_linear_f32_equals_f_linear(m, n, k, seed):
    """The GEMV (one row; every K, masked tails included) and the at::linear of more rows."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    assert torch.allclose(fl._state["module"].linear_f32(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("tied", [True, False])
def test_fp32_head_and_batched_rows(tied):
    """The LM head's one-row GEMV equals the plain head; oneDNN's batched rows keep the plain layer."""
    from minfer.kernels.onednn_linear import pack_linears
    model = _model("fp32", tie_word_embeddings=tied)
    x = torch.randn(1, 1, 64)
    fused = model.compute_logits(x)
    fl.prepare_fused_layers(model, enabled=False)
    assert model.fused_head is None
    assert torch.allclose(fused, model.compute_logits(x), atol=1e-4, rtol=0)
    pack_linears(model, rows=(4, 128))
    assert fl.prepare_fused_layers(model) is None
    layer = model.model.layers[0]
    for rows, taken in ((1, True), (2, True), (4, False)):
        positions, cache = torch.zeros(rows, 1, dtype=torch.long), ContiguousKVCache(model.cfg, rows, 16)
        cos, sin = rope_cos_sin(model.inv_freq, positions)
        out = layer.fused(torch.randn(rows, 1, 64), cos, sin, positions, cache, None, get_backend("sdpa"))
        assert (out is not None) == taken
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(128, 64, bias=False)   # swapped: plain again
    assert layer.fused(torch.randn(1, 1, 64), cos[:1], sin[:1], positions[:1], cache, None,
                       get_backend("sdpa")) is None


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp32", "int4-g32"])
def test_a_layers_weights_share_one_2mb_aligned_buffer_and_save_unchanged(tmp_path, fmt):
    from minfer.checkpoints.hf import load_hf_folder, save_hf_folder
    plain = build_model(tiny_config(hidden_size=64, intermediate_size=128), seed=3)
    want = {k: v.clone() for k, v in plain.state_dict().items()}
    model = _model(fmt, seed=3)
    for layer in model.model.layers:
        if fmt == "fp32":
            ws = [lin.weight for lin in layer.fused.linears]
        else:
            layer.fused._weights()
            ws = [t for p in layer.fused._packed for t in (p.u, p.ab)]
        assert len({w.untyped_storage().data_ptr() for w in ws}) == 1        # one buffer per layer
        assert ws[0].data_ptr() % (2 << 20) == 0 and all(w.is_contiguous() for w in ws)
        assert [w.data_ptr() for w in ws] == sorted(w.data_ptr() for w in ws)   # in the step's order
    if fmt == "fp32":                                   # same values; views save like tensors
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
        folder = save_hf_folder(tmp_path / "m", model.cfg, got)
        assert all(torch.equal(t, want[k]) for k, t in load_hf_folder(folder)[1].items())
