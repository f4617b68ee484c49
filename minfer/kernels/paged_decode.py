"""Paged decode attention as one Triton kernel: a readable PagedAttention.

One decode step gives every running sequence one new query token. Its keys and
values live scattered in the paged pool (``kv/paged.py``)::

    k_cache, v_cache   (num_blocks, block_size, n_kv_heads, head_dim)   one layer of the pool
    block_tables       (S, max_blocks) int32   logical block j of sequence s -> physical block
    context_lens       (S,) int32              keys sequence s may see (its new token included)
    q                  (S, n_heads, head_dim)  the new token's queries
    out                (S, n_heads, head_dim)

The kernel launches one *program* per (sequence, K/V head). A program:

1. loads the g = n_heads // n_kv_heads query heads that share this K/V head as
   one (g, head_dim) tile (GQA: the K/V head is read once for all of them,
   the same trick as FlashAttention's ``seqlenq_ngroups_swapped``);
2. walks the sequence's block table, one block of ``block_size`` keys at a time,
   loading K and V straight from the pool (no gathered copy is ever built);
3. folds each block into the online softmax (running max m, running sum l,
   unnormalised output acc; ``attention/flash.py`` has the same recurrence in
   plain PyTorch);
4. writes acc / l.

vLLM's equivalent is ``csrc/attention/paged_attention_v1.cu`` (CUDA) and the
Triton ``vllm/attention/ops/paged_attn.py`` / ``triton_decode_attention.py``.
This one leaves out what makes theirs fast on big GPUs (splitting a long
context over several programs and reducing them, "v2"; tensor-core tiles via
``tl.dot``, which needs tiles of 16 or more); it is written to be read.

Triton is optional (``pip install -e ".[triton]"``). Without a CUDA GPU the
kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before this
module is imported): slow, numpy under the hood, but the same program, which
is how the tests check it on CPU against ``minfer.attention.paged.paged_attention_reference``.
"""
import math

import torch

from minfer.kernels import check_paged_decode_args

try:                                    # optional dependency: the error below says how to get it
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - depends on the environment
    triton = None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton decode-attention kernel needs Triton: pip install -e \".[triton]\" "
                           "(on a machine without a CUDA GPU, also set TRITON_INTERPRET=1 before importing "
                           "minfer.kernels to run it in Triton's interpreter)")


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, BlockTables, ContextLens, Out, scale,
        stride_qs, stride_qh,                    # q (S, nh, hd): sequence, head strides (dim stride 1)
        stride_kb, stride_kt, stride_kh,         # k/v (num_blocks, block_size, nkv, hd)
        stride_bts,                              # block_tables (S, max_blocks)
        stride_os, stride_oh,                    # out (S, nh, hd)
        GROUP: tl.constexpr,                     # query heads per K/V head
        GROUP_PAD: tl.constexpr,                 # GROUP rounded up to a power of two
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        WINDOW: tl.constexpr,                    # sliding window, 0 = none
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        ctx = tl.load(ContextLens + seq)                              # keys 0 .. ctx-1 are visible

        g = tl.arange(0, GROUP_PAD)                                   # (G,)  query heads of the group
        d = tl.arange(0, HEAD_DIM_PAD)                                # (D,)
        t = tl.arange(0, BLOCK_SIZE)                                  # (T,)  slots of one block
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)     # (G, D)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)           # running max of the scores
        l = tl.zeros([GROUP_PAD], tl.float32)                         # running sum of exp(score - m)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)         # running sum of exp(...) * v

        first = 0                                                     # first visible key
        if WINDOW > 0:
            first = tl.maximum(ctx - WINDOW, 0)
        for j in range(first // BLOCK_SIZE, tl.cdiv(ctx, BLOCK_SIZE)):
            block = tl.load(BlockTables + seq * stride_bts + j)       # physical block of logical block j
            pos = j * BLOCK_SIZE + t                                  # (T,) key positions
            visible = (pos < ctx) & (pos >= first)
            kv_off = block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
            kv_ok = visible[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_ok, other=0.0).to(tl.float32)             # (T, D)
            v = tl.load(V + kv_off, mask=kv_ok, other=0.0).to(tl.float32)             # (T, D)

            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                 # (G, T) scores
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))                                  # (G,)
            alpha = tl.exp(m - m_new)                                                 # rescale the old sums
            p = tl.exp(s - m_new[:, None])                                            # (G, T)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # (G, D)
            m = m_new

        l = tl.where(l > 0, l, 1.0)                                   # a sequence with no keys gives zeros
        out = acc / l[:, None]
        tl.store(Out + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Decode attention over the paged pool with the Triton kernel -> (S, nh, hd).

    Shapes as in the module docstring. ``window``: only the last ``window`` keys
    are visible (sliding-window models); None = all.
    """
    _require_triton()
    check_paged_decode_args(q, k_cache, v_cache, block_tables, context_lens)
    S, nh, hd = q.shape
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    if bs & (bs - 1):
        raise ValueError(f"paged_decode_attention: block_size must be a power of two, got {bs}")
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    g = nh // nkv
    _paged_decode_kernel[(S, nkv)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        1.0 / math.sqrt(hd) if scale is None else scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=g, GROUP_PAD=triton.next_power_of_2(g),
        HEAD_DIM=hd, HEAD_DIM_PAD=triton.next_power_of_2(hd),
        BLOCK_SIZE=bs, WINDOW=window or 0,
    )
    return out
