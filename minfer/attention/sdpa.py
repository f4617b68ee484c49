"""Attention through torch's fused ``scaled_dot_product_attention`` (``enable_gqa=True``).

``sdpa`` stacks the query heads that share a K/V head at decode, so each K/V head is read once
(docs/kv-and-attention.md).
"""
import torch
import torch.nn.functional as F

from minfer.attention.mask import allowed


def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """``F.scaled_dot_product_attention`` for q (B, nh, T, hd), k/v (B, nkv, S, hd), nh a multiple of nkv.
    At a GQA decode the g = nh / nkv query heads of a K/V head become its g queries, (B, nkv, g, hd), so
    each K/V head streams once (flash-attn's ``seqlenq_ngroups_swapped``); a mask must then be (B or 1, 1,
    1, S). Measured: docs/kv-and-attention.md."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    if T == 1 and nh != nkv and not is_causal and (attn_mask is None or attn_mask.shape[1] == 1):
        out = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hd), k, v,
                                             attn_mask=attn_mask, scale=scale)      # (B, nkv, g, hd)
        return out.reshape(B, nh, 1, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=nh != nkv)


def sdpa_attention(q, k, v, q_pos, k_pos, window=None, scale=None):
    """The backend signature over ``sdpa``: the mask built from positions on the device, no host reads
    (so that a captured CUDA graph can run it). A query with no visible key (padding) gets zeros."""
    mask = allowed(q_pos, k_pos, window)[:, None]                                  # (B, 1, T, S)
    out = sdpa(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


sdpa_attention.unmasked = sdpa     # every key visible to every query: no mask to build
