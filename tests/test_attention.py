"""Attention backends: flash and sdpa against the reference, for any shapes, offsets and windows."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import describe_diff

from minfer.attention import flash_attention, reference_attention, sdpa_attention
from minfer.attention.flash import online_softmax_update


@st.composite
def attention_inputs(draw):
    B = draw(st.integers(1, 2))
    nkv = draw(st.sampled_from([1, 2]))
    nh = nkv * draw(st.sampled_from([1, 3]))
    hd = draw(st.sampled_from([4, 8]))
    T = draw(st.integers(1, 20))
    offset = draw(st.integers(0, 20))                 # keys already in the cache before this chunk
    S = offset + T
    window = draw(st.one_of(st.none(), st.integers(1, 10)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hd, generator=g)
    k, v = torch.randn(B, nkv, S, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g)
    q_pos = torch.arange(offset, S).expand(B, T)
    k_pos = torch.arange(S).expand(B, S).clone()
    if draw(st.booleans()):                            # some empty slots (-1), as in a ring or padding
        k_pos[:, :offset] = torch.where(torch.rand(B, offset, generator=g) < 0.3, -1, k_pos[:, :offset])
    return q, k, v, q_pos, k_pos, window


@settings(max_examples=80, deadline=None)
@given(inp=attention_inputs(), bq=st.integers(1, 9), bk=st.integers(1, 9))
def test_flash_equals_reference(inp, bq, bk):
    q, k, v, q_pos, k_pos, window = inp
    ref = reference_attention(q, k, v, q_pos, k_pos, window=window)
    out = flash_attention(q, k, v, q_pos, k_pos, window=window, block_q=bq, block_k=bk)
    assert torch.allclose(out, ref, atol=1e-5), describe_diff(out, ref)


@settings(max_examples=60, deadline=None)
@given(inp=attention_inputs())
def test_sdpa_equals_reference(inp):
    q, k, v, q_pos, k_pos, window = inp
    ref = reference_attention(q, k, v, q_pos, k_pos, window=window)
    out = sdpa_attention(q, k, v, q_pos, k_pos, window=window)
    assert torch.allclose(out, ref, atol=1e-5), describe_diff(out, ref)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), nkv=st.integers(1, 3), group=st.integers(2, 4), S=st.integers(1, 40),
       window=st.one_of(st.none(), st.integers(1, 10)), holes=st.booleans(), seed=st.integers(0, 2**16))
def test_sdpa_decode_with_gqa_folds_heads_exactly(B, nkv, group, S, window, holes, seed):
    """One query per sequence with GQA: the query heads of a group are stacked as queries of their
    K/V head (sdpa.sdpa). Same result as the reference and as torch's own enable_gqa path."""
    import torch.nn.functional as F

    from minfer.attention.sdpa import sdpa
    g = torch.Generator().manual_seed(seed)
    nh, hd = nkv * group, 8
    q = torch.randn(B, 1, nh, hd, generator=g).transpose(1, 2)       # (B, nh, 1, hd), strided like the model's
    k, v = torch.randn(B, nkv, S, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g)
    q_pos = torch.full((B, 1), S - 1)
    k_pos = torch.arange(S).expand(B, S).clone()
    if holes:
        k_pos[:, :-1] = torch.where(torch.rand(B, S - 1, generator=g) < 0.3, -1, k_pos[:, :-1])
    ref = reference_attention(q, k, v, q_pos, k_pos, window=window)
    out = sdpa_attention(q, k, v, q_pos, k_pos, window=window)
    assert torch.allclose(out, ref, atol=1e-5), describe_diff(out, ref)
    mask = (k_pos >= 0)[:, None, None]                                  # (B, 1, 1, S)
    torch_gqa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(sdpa(q, k, v, attn_mask=mask), torch_gqa, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), tile=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_online_softmax_equals_softmax(n, tile, seed):
    """Folding scores in tile by tile gives exactly softmax(scores) @ values."""
    g = torch.Generator().manual_seed(seed)
    scores, values = torch.randn(3, n, generator=g) * 5, torch.randn(n, 4, generator=g)
    m, l, acc = torch.full((3, 1), float("-inf")), torch.zeros(3, 1), torch.zeros(3, 4)
    for j in range(0, n, tile):
        m, l, acc = online_softmax_update(m, l, acc, scores[:, j:j + tile], values[j:j + tile])
    assert torch.allclose(acc / l, torch.softmax(scores, -1) @ values, atol=1e-5)


def test_bench_attention_methods_agree_and_bad_flags_are_named():
    """`minfer bench attention` times three ways of feeding GQA decode to SDPA: same output for each."""
    import pytest

    from minfer.bench.attention import METHODS, decode_attention
    from minfer.bench.timing import positive_ints
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 1, 6, 8, generator=g).transpose(1, 2)          # (B, nh=6, 1, hd)
    k, v = torch.randn(3, 2, 11, 8, generator=g), torch.randn(3, 2, 11, 8, generator=g)
    outs = [decode_attention(m, q, k, v) for m in METHODS]
    for m, o in zip(METHODS[1:], outs[1:]):
        assert torch.allclose(o, outs[0], atol=1e-6), m
    with pytest.raises(ValueError, match="--batch"):
        positive_ints("1,x", "--batch")
    with pytest.raises(ValueError, match="--context: every value must be >= 1"):
        positive_ints("0", "--context")
