"""FlashAttention-2's recurrence in plain PyTorch: tiles, online softmax, one final division.

Dao, "FlashAttention-2" (2023), Algorithm 1, with Python loops: slower than ``sdpa``, written to
be read next to the paper and tested. The recurrence: docs/kv-and-attention.md.
"""
import math

import torch

from minfer.attention.mask import allowed


def online_softmax_update(m, l, acc, scores, values):
    """One step of the recurrence: fold scores (…, tq, tk; masked = -inf) and values (…, tk, hd) into
    m, l (running max and sum, (…, tq, 1)) and acc (unnormalised output, (…, tq, hd)) -> new (m, l, acc)."""
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
    # Rows that have seen no visible key yet keep m = -inf; use 0 as the shift there.
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - shift)                                   # exp(-inf) = 0 for masked keys
    alpha = torch.exp(m - shift)                                    # rescales what came before
    l_new = alpha * l + p.sum(dim=-1, keepdim=True)
    acc_new = alpha * acc + p @ values
    return m_new, l_new, acc_new


def flash_attention(q, k, v, q_pos, k_pos, window=None, scale=None, block_q: int = 64, block_k: int = 64):
    """Tiled attention; ``block_q``/``block_k`` need not divide T or S."""
    if block_q < 1 or block_k < 1:
        raise ValueError(f"tile sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qg = q.float().reshape(B, nkv, g, T, hd)                        # group query heads per K/V head
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]           # (B, nkv, 1, S, hd)
    out = torch.empty_like(qg)
    for i0 in range(0, T, block_q):
        qi = qg[..., i0:i0 + block_q, :]                            # (B, nkv, g, tq, hd)
        qpos_i = q_pos[:, i0:i0 + block_q]                          # (B, tq)
        m = torch.full(qi.shape[:-1] + (1,), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        for j0 in range(0, S, block_k):
            kpos_j = k_pos[:, j0:j0 + block_k]                      # (B, tk)
            visible = allowed(qpos_i, kpos_j, window)               # (B, tq, tk)
            if not bool(visible.any()):                             # whole tile masked: skip it
                continue
            s = (qi @ kf[..., j0:j0 + block_k, :].transpose(-1, -2)) * scale   # (B, nkv, g, tq, tk)
            s = s.masked_fill(~visible[:, None, None], float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, s, vf[..., j0:j0 + block_k, :])
        out[..., i0:i0 + block_q, :] = acc / l.clamp_min(torch.finfo(l.dtype).tiny)  # rows with no key stay 0
    return out.reshape(B, nh, T, hd).to(q.dtype)
