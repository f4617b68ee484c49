"""A hybrid local/global KV cache: global layers in a ``ContiguousKVCache`` (max_len slots each), local
ones in a ``SlidingWindowKVCache`` (a ring of W slots). Gemma 3 270M at 8192 tokens: 3.94
layer-equivalents instead of 18 (``kv_bytes_per_token``). The single-sequence version of vLLM's hybrid
KV cache manager (``vllm/v1/core/kv_cache_coordinator.py``); llama.cpp: ``llama_kv_cache_iswa``. The
arithmetic: docs/kv-and-attention.md.
"""
import dataclasses

import torch

from minfer.kv.base import DenseKVCache, KVView
from minfer.kv.contiguous import ContiguousKVCache
from minfer.kv.sliding import SlidingWindowKVCache


def _group_config(cfg, num_layers: int):
    """The same attention shape with ``num_layers`` layers, all alike (the sub-caches size by it)."""
    return dataclasses.replace(cfg, num_hidden_layers=num_layers, layer_types=None, sliding_window=None)


class HybridKVCache(DenseKVCache):
    """Global layers in a contiguous cache, sliding-window layers in a ring of ``window`` slots."""

    def __init__(self, cfg, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu"):
        if cfg.kv_share_group != 1:
            raise ValueError("a hybrid cache needs kv_share_group = 1 (every layer its own K/V)")
        windows = [cfg.window_of(i) for i in range(cfg.num_hidden_layers)]
        self.global_layers = [i for i, w in enumerate(windows) if w is None]
        self.local_layers = [i for i, w in enumerate(windows) if w is not None]
        if len(set(w for w in windows if w is not None)) > 1:
            raise ValueError("a hybrid cache supports one window size for all local layers")
        self.full = self.ring = None
        if self.global_layers:
            self.full = ContiguousKVCache(_group_config(cfg, len(self.global_layers)), batch_size, max_len,
                                          dtype=dtype, device=device)
        if self.local_layers:
            window = min(cfg.window_of(self.local_layers[0]), max_len)   # a shorter context never fills W
            self.ring = SlidingWindowKVCache(_group_config(cfg, len(self.local_layers)), batch_size, window,
                                             dtype=dtype, device=device)
        self.route = {layer: (self.full, j) for j, layer in enumerate(self.global_layers)}
        self.route.update({layer: (self.ring, j) for j, layer in enumerate(self.local_layers)})

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVView:
        cache, index = self.route[layer]            # the layer's group, and its slot within the group
        return cache.update(index, k, v, positions)

    def truncate(self, length: int) -> None:
        for cache in (self.full, self.ring):
            if cache is not None:
                cache.truncate(length)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in (self.full, self.ring) if c is not None)


def kv_bytes_per_token(cfg, context: int, bytes_per_value: int = 4) -> dict[str, float]:
    """KV bytes per token of one sequence at ``context`` tokens: full cache vs hybrid (the formula above)."""
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value        # K and V, one token
    windows = [cfg.window_of(i) for i in range(cfg.num_hidden_layers)]
    hybrid = sum(per_layer * (1 if w is None else min(w, context) / context) for w in windows)
    return {"full": per_layer * cfg.num_hidden_layers, "hybrid": hybrid}
