"""The KV-cache interface the model calls (mini-sglang's ``BaseKVCache``; vLLM's ``AttentionImpl.forward``).

Per layer: ``view = cache.update(kv_layer, k, v, positions)`` stores this forward's K/V, then
``cache.attend(kv_layer, q, view, positions, backend, window)`` -> outputs (docs/kv-and-attention.md).
"""
from typing import NamedTuple, Protocol

import torch

from minfer.attention import AttentionBackend


class KVView(NamedTuple):
    """Keys and values the queries of one forward may see."""

    keys: torch.Tensor        # (B, n_kv_heads, S, hd)
    values: torch.Tensor      # (B, n_kv_heads, S, hd)
    key_pos: torch.Tensor     # (B, S) absolute position of each key; -1 = empty slot


class KVCache(Protocol):
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVView:
        """Store k, v (B, nkv, T, hd) of tokens at ``positions`` (B, T); return what may be read."""

    def attend(self, layer: int, q: torch.Tensor, view: KVView, positions: torch.Tensor,
               backend: AttentionBackend, window: int | None = None) -> torch.Tensor:
        """Queries q (B, nh, T, hd) at ``positions`` -> attention output (B, nh, T, hd)."""

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated."""


class DenseKVCache:
    """Base of the caches that return ordinary tensors: attention is the backend's, unchanged."""

    def attend(self, layer: int, q: torch.Tensor, view: KVView, positions: torch.Tensor,
               backend: AttentionBackend, window: int | None = None) -> torch.Tensor:
        return backend(q, view.keys, view.values, positions, view.key_pos, window=window)


class NoCache(DenseKVCache):
    """No cache at all: the queries see exactly this forward's keys (the whole sequence, as the oracle)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVView:
        return KVView(k, v, positions)

    def nbytes(self) -> int:
        return 0


NO_CACHE = NoCache()
