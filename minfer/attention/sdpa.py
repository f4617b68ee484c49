"""Attention through torch's fused ``scaled_dot_product_attention``.

torch picks a kernel (FlashAttention, memory-efficient, or its C++ math path
on CPU). We pass ``enable_gqa=True`` so K/V heads are shared without copies,
and skip the mask entirely in the two common cases where it is implied:

  * decode over a full, gap-free cache with no window: every key is visible;
  * a prefill that starts at position 0 with no cache: plain causal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minfer.attention.mask import allowed


def _all_visible(q_pos, k_pos, window) -> bool:
    """True when no key needs masking: a single query after every valid key."""
    if q_pos.shape[1] != 1 or window is not None:
        return False
    return bool(((k_pos >= 0) & (k_pos <= q_pos)).all())


def sdpa_attention(q, k, v, q_pos, k_pos, window=None, scale=None):
    kw = dict(scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if _all_visible(q_pos, k_pos, window):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if window is None and q_pos.shape == k_pos.shape and torch.equal(q_pos, k_pos) \
            and bool((q_pos[:, 0] == 0).all()) and bool((q_pos.diff(dim=1) == 1).all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    mask = allowed(q_pos, k_pos, window)[:, None]                   # (B, 1, T, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    # A query with no visible key (padding) gets NaN from softmax; zero it.
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
