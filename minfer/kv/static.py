"""The static contiguous cache: the single-request loop with fixed shapes (gpt-fast's decode step).

Every forward attends over all ``max_len`` slots, masked on the device: one shape, no host read, so
it can be captured as a CUDA graph. gpt-fast: ``causal_mask[input_pos]``. docs/kv-and-attention.md.
"""
import torch

from minfer.kv.base import KVView
from minfer.kv.contiguous import ContiguousKVCache


class StaticKVCache(ContiguousKVCache):
    """A contiguous cache whose every read is all ``max_len`` slots, masked on the device (no host reads)."""

    def __init__(self, cfg, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu"):
        super().__init__(cfg, batch_size, max_len, dtype=dtype, device=device)
        self._key_pos = self._slots[None].expand(batch_size, -1)            # (B, max_len): slot j holds position j

    def update(self, layer, k, v, positions):
        """Write k, v (B, nkv, T, hd) at ``positions`` (B, T, the same for every row); return every slot."""
        self.k[layer].index_copy_(2, positions[0], k)
        self.v[layer].index_copy_(2, positions[0], v)
        return KVView(self.k[layer], self.v[layer], self._key_pos)

    def truncate(self, length: int) -> None:
        raise NotImplementedError("StaticKVCache serves the plain single-request loop; speculative "
                                  "decoding rolls back a ContiguousKVCache")
