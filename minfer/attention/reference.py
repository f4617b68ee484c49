"""Reference attention: scores, explicit mask, softmax, weighted sum. Slow and obvious.

The naive oracle's math against the backend signature; fully masked rows (padding) give zeros.
"""
import math

import torch

from minfer.attention.mask import allowed


def reference_attention(q, k, v, q_pos, k_pos, window=None, scale=None):
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv                                                   # query heads per K/V head
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qg = q.reshape(B, nkv, g, T, hd)                                # (B, nkv, g, T, hd)
    scores = qg.float() @ k.float()[:, :, None].transpose(-1, -2)   # (B, nkv, g, T, S)
    scores = scores * scale
    mask = allowed(q_pos, k_pos, window)[:, None, None]             # (B, 1, 1, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)           # empty rows -> 0
    out = probs @ v.float()[:, :, None]                             # (B, nkv, g, T, hd)
    return out.reshape(B, nh, T, hd).to(q.dtype)
