"""Where K and V live between forward passes.

Every cache has the interface declared in ``kv/base.py`` (``KVCache``), used by ``model.Attention``::

    view = cache.update(kv_layer, k, v, positions)      # KVView(keys, values, key_pos)
        k, v       (B, n_kv_heads, T, hd)  this forward's new keys/values (after RoPE)
        positions  (B, T)                  their absolute positions
        view       every key/value the new queries may see, (B, n_kv_heads, S, hd),
                   and their positions (B, S), -1 for an empty slot
    out = cache.attend(kv_layer, q, view, positions, backend, window)
    cache.truncate(length)   (contiguous caches) roll back: forget everything at positions >= length
    cache.nbytes()           bytes of K/V storage actually allocated

Caches:
  ContiguousKVCache    one preallocated max-length buffer per sequence (gpt-fast)
  StaticKVCache        the same, read whole and masked on the device: fixed shapes for CUDA graphs
  SlidingWindowKVCache a ring buffer of the last W positions: memory O(W)
  QuantizedKVCache     int8 (or fp8) values with a per-token, per-head scale
  EvictingKVCache      at most a budget of tokens per layer: StreamingLLM, H2O or SnapKV (evict.py)
  PagedKVCache         blocks shared by many sequences, with int8/fp8 pages; attention through
                       their block tables is minfer/attention/paged.py's, the bookkeeping
                       (BlockPool, KVCacheManager) block_pool.py's; the engine drives it
"""
from minfer.kv.contiguous import ContiguousKVCache, kv_cache_bytes
from minfer.kv.evict import EvictingKVCache
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
    if kind == "contiguous":
        return ContiguousKVCache(cfg, batch_size, max_len, dtype=dtype, device=device)
    if kind == "static":
        return StaticKVCache(cfg, batch_size, max_len, dtype=dtype, device=device)
    if kind == "sliding":
        if cfg.is_hybrid:
            raise ValueError("a sliding-window cache keeps the last W tokens for every layer, but this model "
                             "has global layers too: use kv_cache='contiguous'")
        w = window or cfg.sliding_window
        if w is None:
            raise ValueError("a sliding-window cache needs a window: set ModelConfig.sliding_window")
        return SlidingWindowKVCache(cfg, batch_size, w, dtype=dtype, device=device)
    if kind == "hybrid":
        from minfer.kv.hybrid import HybridKVCache
        return HybridKVCache(cfg, batch_size, max_len, dtype=dtype, device=device)
    if kind in ("int8", "fp8"):
        return QuantizedKVCache(cfg, batch_size, max_len, fmt=kind, dtype=dtype, device=device)
    raise ValueError(f"unknown kv cache kind {kind!r}; choose contiguous, static, sliding, hybrid, int8 or fp8")
