"""The Triton paged decode-attention kernel against the reference (interpreter on CPU, CUDA when present)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before the kernel module is imported
triton = pytest.importorskip("triton")

from hypothesis import given, settings, strategies as st  # noqa: E402

from tiny import paged_pool as _pool  # noqa: E402
from minfer.attention.paged import paged_attention_reference  # noqa: E402
from minfer.kernels import paged_decode_attention  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(S=st.integers(1, 4), nkv=st.integers(1, 3), g=st.sampled_from([1, 2, 3, 4]), hd=st.sampled_from([8, 12, 16]),
       bs=st.sampled_from([1, 16, 32]), data=st.data(), window=st.sampled_from([None, 5]))
def test_kernel_matches_reference_on_cpu_interpreter(S, nkv, g, hd, bs, data, window):
    lens = data.draw(st.lists(st.integers(0, 70), min_size=S, max_size=S), label="context_lens")
    q, k, v, tables, clens = _pool(S, nkv, g, hd, bs, lens, "cpu", torch.float32, seed=S * 7 + hd)
    out = paged_decode_attention(q, k, v, tables, clens, window=window)
    ref = paged_attention_reference(q, k, v, tables, clens, window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_named():
    q, k, v, tables, clens = _pool(2, 2, 2, 8, 4, [3, 4], "cpu", torch.float32, seed=1)
    with pytest.raises(ValueError, match="group"):
        paged_decode_attention(q[:, :3], k, v, tables, clens)
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_decode_attention(q, k, v, tables[:1], clens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_on_gpu(dtype):
    lens = [1, 17, 300, 1024, 0, 64]
    q, k, v, tables, clens = _pool(6, 3, 3, 64, 16, lens, "cuda", dtype, seed=3)
    out = paged_decode_attention(q, k, v, tables, clens)
    ref = paged_attention_reference(q, k, v, tables, clens)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_bench_attention_pages_feed_the_kernel_the_same_keys():
    """`minfer bench attention`'s triton method sees the same K/V as the other methods."""
    from minfer.bench.attention import _as_pages, decode_attention
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 1, 8, generator=gen)
    k, v = torch.randn(2, 2, 21, 8, generator=gen), torch.randn(2, 2, 21, 8, generator=gen)
    (kp, tables), (vp, _) = _as_pages(k, 16), _as_pages(v, 16)
    out = paged_decode_attention(q[:, :, 0], kp, vp, tables, torch.tensor([21, 21]))
    torch.testing.assert_close(out, decode_attention("gqa", q, k, v)[:, :, 0], atol=1e-5, rtol=1e-5)
