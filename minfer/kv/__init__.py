"""Where K and V live between forward passes: every cache has ``kv/base.py``'s interface.

Contiguous (gpt-fast), static (CUDA graphs), sliding (a ring of W), hybrid (local/global), int8/fp8,
evicting (StreamingLLM, H2O, SnapKV) and paged (the engine's). docs/kv-and-attention.md.
"""
from minfer.kv.contiguous import ContiguousKVCache, kv_cache_bytes
from minfer.kv.evict import EvictingKVCache
from minfer.kv.hybrid import HybridKVCache
from minfer.kv.quantized import QuantizedKVCache, dequantize_kv, quantize_kv
from minfer.kv.sliding import SlidingWindowKVCache
from minfer.kv.static import StaticKVCache
from minfer.kv.block_pool import BlockPool, KVCacheManager, block_hashes, hash_block_tokens
from minfer.kv.paged import PagedBatch, PagedKVCache

__all__ = ["ContiguousKVCache", "StaticKVCache", "SlidingWindowKVCache", "QuantizedKVCache", "EvictingKVCache",
           "kv_cache_bytes",
           "quantize_kv", "dequantize_kv", "make_cache",
           "BlockPool", "KVCacheManager", "PagedKVCache", "PagedBatch", "block_hashes", "hash_block_tokens"]


def make_cache(kind: str, cfg, batch_size: int, max_len: int, *, dtype, device, window: int | None = None):
    """Build a cache by name: "contiguous", "static", "sliding", "hybrid", "int8" or "fp8"."""
    classes = {"contiguous": ContiguousKVCache, "static": StaticKVCache, "hybrid": HybridKVCache}
    if kind in classes:
        return classes[kind](cfg, batch_size, max_len, dtype=dtype, device=device)
    if kind == "sliding":
        if cfg.is_hybrid:
            raise ValueError("a sliding-window cache keeps the last W tokens for every layer, but this model "
                             "has global layers too: use kv_cache='contiguous'")
        w = window or cfg.sliding_window
        if w is None:
            raise ValueError("a sliding-window cache needs a window: set ModelConfig.sliding_window")
        return SlidingWindowKVCache(cfg, batch_size, w, dtype=dtype, device=device)
    if kind in ("int8", "fp8"):
        return QuantizedKVCache(cfg, batch_size, max_len, fmt=kind, dtype=dtype, device=device)
    raise ValueError(f"unknown kv cache kind {kind!r}; choose contiguous, static, sliding, hybrid, int8 or fp8")
