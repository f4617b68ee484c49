"""What the paged decode kernels are tested against: shape checks and a plain-PyTorch reference.

No Triton and no compiler here, so that the reference imports everywhere. The kernels
(``paged_decode.py``: Triton; ``cpu_paged_decode.py``: C++) share these shapes::

    q                  (S, n_heads, head_dim)
    k_cache, v_cache   (num_blocks, block_size, n_kv_heads, head_dim)   one layer of the pool
    block_tables       (S, max_blocks)
    context_lens       (S,)
"""
from __future__ import annotations

import torch


def check_paged_decode_args(q, k_cache, v_cache, block_tables, context_lens) -> None:
    """ValueError naming the problem when the shapes above do not fit together."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention: expected q (S, nh, hd) and k/v caches (num_blocks, "
                         f"block_size, nkv, hd), got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    S, nh, hd = q.shape
    nkv = k_cache.shape[2]
    if k_cache.shape[3] != hd or nh % nkv:
        raise ValueError(f"paged_decode_attention: {nh} query heads of {hd} do not group over "
                         f"{nkv} K/V heads of {k_cache.shape[3]}")
    if block_tables.shape[0] != S or context_lens.shape != (S,):
        raise ValueError(f"paged_decode_attention: block_tables {tuple(block_tables.shape)} and context_lens "
                         f"{tuple(context_lens.shape)} must have one row per sequence ({S})")


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """The same result in plain PyTorch: gather each sequence's keys, then reference attention.

    The kernel is tested equal to this (and this to ``attention.reference``).
    """
    from minfer.attention.reference import reference_attention

    check_paged_decode_args(q, k_cache, v_cache, block_tables, context_lens)
    S, nh, hd = q.shape
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    n = int(context_lens.max()) if S else 0
    pos = torch.arange(max(n, 1), device=q.device)                               # (Smax,)
    lens = context_lens.to(q.device).long()
    k_pos = torch.where(pos[None] < lens[:, None], pos[None], -1)                # (S, Smax), -1 = padding
    blocks = block_tables.long()[:, (pos // bs).clamp_max(block_tables.shape[1] - 1)]
    slots = (blocks * bs + pos % bs).masked_fill(k_pos < 0, 0)                  # (S, Smax)
    keys = k_cache.reshape(-1, nkv, hd)[slots].transpose(1, 2)                   # (S, nkv, Smax, hd)
    values = v_cache.reshape(-1, nkv, hd)[slots].transpose(1, 2)
    q_pos = (lens - 1).clamp_min(-1)[:, None]                                    # (S, 1): the newest token
    out = reference_attention(q[:, :, None].float(), keys.float(), values.float(), q_pos, k_pos,
                              window=window, scale=scale)                       # (S, nh, 1, hd)
    return out[:, :, 0].to(q.dtype)
