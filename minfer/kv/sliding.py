"""A ring-buffer KV cache for sliding-window attention: memory O(W), not O(sequence).

Mistral 7B's "rolling buffer cache" (Jiang et al. 2023): position p lives in slot p % W.
``update`` returns the old ring plus the new keys, then writes (docs/kv-and-attention.md).
"""
import torch

from minfer.kv.base import DenseKVCache, KVView


class SlidingWindowKVCache(DenseKVCache):
    def __init__(self, cfg, batch_size: int, window: int, *, dtype=torch.float32, device="cpu"):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        L, nkv, hd = cfg.num_kv_layers, cfg.num_key_value_heads, cfg.head_dim
        self.window = window
        self.k = torch.zeros(L, batch_size, nkv, window, hd, dtype=dtype, device=device)  # ring of keys
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((L, batch_size, window), -1, dtype=torch.long, device=device)

    def update(self, layer, k, v, positions):
        B, nkv, T, hd = k.shape
        keys = torch.cat([self.k[layer], k], dim=2)                   # (B, nkv, W + T, hd)
        values = torch.cat([self.v[layer], v], dim=2)
        key_pos = torch.cat([self.slot_pos[layer], positions], dim=1)  # (B, W + T)
        keep = min(T, self.window)                                    # older new tokens fall out anyway
        pos = positions[:, T - keep:]                                 # (B, keep)
        slots = pos % self.window
        idx = slots[:, None, :, None].expand(B, nkv, keep, hd)
        self.k[layer].scatter_(2, idx, k[:, :, T - keep:])
        self.v[layer].scatter_(2, idx, v[:, :, T - keep:])
        self.slot_pos[layer].scatter_(1, slots, pos)
        return KVView(keys, values, key_pos)

    def truncate(self, length: int) -> None:
        """Forget positions >= length. (Positions that already left the ring cannot come back.)"""
        self.slot_pos.masked_fill_(self.slot_pos >= length, -1)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
