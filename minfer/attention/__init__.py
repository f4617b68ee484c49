"""How attention is computed, given q, the visible keys/values, and positions.

Every backend has the same signature::

    backend(q, k, v, q_pos, k_pos, window=None, scale=None) -> out
      q      (B, n_heads,    T, hd)   queries of the tokens in this forward
      k, v   (B, n_kv_heads, S, hd)   every key/value they may look at
      q_pos  (B, T)                   absolute position of each query
      k_pos  (B, S)                   absolute position of each key; -1 = empty slot
      out    (B, n_heads,    T, hd)

Who may attend to whom follows from positions alone (see ``mask.allowed``):
key s is visible to query t when 0 <= k_pos[s] <= q_pos[t] (causal) and, with a
sliding window W, q_pos[t] - k_pos[s] < W. This one rule covers prefill,
decode, chunked prefill, ring-buffer caches and padded batches alike.

GQA/MQA: query head j reads K/V head j // (n_heads // n_kv_heads). Backends
group the query heads instead of repeating K/V in memory.

Backends:
  reference  explicit scores, explicit mask, softmax  (the oracle's math)
  sdpa       torch.nn.functional.scaled_dot_product_attention
  flash      FlashAttention-2's tiled online softmax in plain PyTorch

Attention through a paged KV pool (block tables, a flattened batch of many sequences)
is ``minfer/attention/paged.py``: backends with ``prepare_metadata(batch)`` once per
step and ``forward(q, k, v, layer)``, which call one of the backends above.
"""
from __future__ import annotations

from typing import Protocol

import torch

from minfer.attention.flash import flash_attention
from minfer.attention.mask import allowed
from minfer.attention.reference import reference_attention
from minfer.attention.sdpa import sdpa_attention



class AttentionBackend(Protocol):
    """The signature every backend shares (see the module docstring for the shapes)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, window: int | None = None, scale: float | None = None) -> torch.Tensor: ...


BACKENDS: dict[str, AttentionBackend] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}


def get_backend(name: str) -> AttentionBackend:
    """Look up an attention backend by name."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}") from None


__all__ = ["AttentionBackend", "BACKENDS", "get_backend", "allowed", "reference_attention", "sdpa_attention", "flash_attention"]
