"""KV cache quantization: int8 (or fp8 e4m3) values with one scale per token and head,
scale = max|x| / QMAX (127 int8, 448 fp8), q = round(x / scale). vLLM: ``kv_cache_dtype="fp8"``;
KIVI (Liu et al. 2024) goes lower. The whole valid prefix is dequantized on every read
(docs/kv-and-attention.md).
"""
import torch

from minfer.kv.base import DenseKVCache, KVView
from minfer.kv.contiguous import ContiguousKVCache
from minfer.validation import check_allocation

QMAX = {"int8": 127.0, "fp8": 448.0}
STORAGE = {"int8": torch.int8, "fp8": getattr(torch, "float8_e4m3fn", None)}


def quantize_kv(x: torch.Tensor, fmt: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hd) -> (q (..., hd) int8/fp8, scale (..., 1) fp32), absmax over the last dim."""
    if fmt not in QMAX or STORAGE[fmt] is None:
        raise ValueError(f"KV quantization format {fmt!r} is not available; use 'int8' or 'fp8'")
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / QMAX[fmt]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero vector: any scale works
    if fmt == "int8":
        q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    else:
        q = (xf / scale).to(STORAGE[fmt])
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q (..., hd) * scale (..., 1) in ``dtype``."""
    return (q.float() * scale).to(dtype)


class QuantizedKVCache(DenseKVCache):
    def __init__(self, cfg, batch_size: int, max_len: int, *, fmt: str = "int8",
                 dtype=torch.float32, device="cpu"):
        if fmt not in QMAX or STORAGE[fmt] is None:
            raise ValueError(f"KV quantization format {fmt!r} is not available here; use 'int8' or 'fp8'")
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be >= 1, got {max_len}, {batch_size}")
        L, nkv, hd = cfg.num_kv_layers, cfg.num_key_value_heads, cfg.head_dim
        self.fmt, self.dtype, self.max_len = fmt, dtype, max_len
        # 1 byte per value + a 4-byte scale per token-head, for K and V; refused up front if too big
        check_allocation(2 * L * batch_size * nkv * max_len * (hd + 4) + 8 * max_len,
                         f"an {fmt} KV cache of {batch_size} x {max_len} tokens", device)
        # K and V in one tensor, built in 1-byte storage directly (no float32 zeros 4x the size first)
        shape = (L, 2, batch_size, nkv, max_len)
        self.kv = torch.zeros(*shape, hd, dtype=torch.int8, device=device).view(STORAGE[fmt])
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]                     # views: (L, B, nkv, max_len, hd)
        self.scales = torch.ones(*shape, 1, device=device)                 # fp32
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)
        self._step_positions = None

    # The contiguous cache's bookkeeping: slot s holds position s, checked once per forward.
    _begin_step, truncate = ContiguousKVCache._begin_step, ContiguousKVCache.truncate

    def update(self, layer, k, v, positions):
        if positions is not self._step_positions:
            self._begin_step(positions)
        q, s = quantize_kv(torch.stack((k, v)), self.fmt)              # (2, B, nkv, T, hd), (2, B, nkv, T, 1)
        idx = positions[None, :, None, :, None]                        # (1, B, 1, T, 1)
        # scatter_ has no fp8 kernel on every build: write through an int8 view of the bytes
        self.kv[layer].view(torch.int8).scatter_(3, idx.expand_as(q), q.view(torch.int8))
        self.scales[layer].scatter_(3, idx.expand_as(s), s)
        S = self._visible
        both = dequantize_kv(self.kv[layer, ..., :S, :], self.scales[layer, ..., :S, :], self.dtype)
        return KVView(both[0], both[1], self._key_pos)

    def nbytes(self) -> int:
        return self.kv.nbytes + self.scales.nbytes
