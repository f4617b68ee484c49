"""The contiguous KV cache: one preallocated buffer per sequence, slot s holds position s.

gpt-fast style (``KVCache`` in gpt-fast's model.py): writes and roll-backs are O(1); every sequence
reserves ``max_len`` slots up front. The layout: docs/kv-and-attention.md.
"""
import torch

from minfer.attention import BACKENDS
from minfer.kv.base import DenseKVCache, KVView
from minfer.validation import check_allocation


def kv_cache_bytes(cfg, num_tokens: int, bytes_per_value: float = 4.0) -> float:
    """KV bytes for `num_tokens` tokens: 2 (K and V) x kv layers x kv heads x head_dim x bytes x tokens."""
    return 2 * cfg.num_kv_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value * num_tokens


class ContiguousKVCache(DenseKVCache):
    def __init__(self, cfg, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu"):
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be >= 1, got {max_len}, {batch_size}")
        shape = (cfg.num_kv_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        itemsize = torch.empty((), dtype=dtype).element_size()
        check_allocation(kv_cache_bytes(cfg, batch_size * max_len, itemsize) + 8 * max_len,
                         f"a contiguous KV cache of {batch_size} x {max_len} tokens", device)   # refuse up front
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # (L, B, nkv, max_len, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self._slots = torch.arange(max_len, device=device)
        self._step_positions = None               # the positions tensor of the forward in progress
        self._all_visible = False                 # one query, at the last position: it sees every slot

    def update(self, layer, k, v, positions):
        """Write k, v (B, nkv, T, hd) at `positions` (B, T); return the valid prefix."""
        if positions is not self._step_positions:
            self._begin_step(positions)           # bookkeeping once per forward, not once per layer
        if self._same_positions:
            self.k[layer].index_copy_(2, positions[0], k)
            self.v[layer].index_copy_(2, positions[0], v)
        else:
            idx = positions[:, None, :, None].expand_as(k)       # (B, nkv, T, hd)
            self.k[layer].scatter_(2, idx, k)
            self.v[layer].scatter_(2, idx, v)
        S = self._visible
        return KVView(self.k[layer, :, :, :S], self.v[layer, :, :, :S], self._key_pos)

    def attend(self, layer, q, view, positions, backend, window=None):
        """One sequence decoding one token sees every cached key: a backend that offers ``unmasked``
        (``sdpa_attention``) then skips building the mask."""
        if self._all_visible and window is None and hasattr(backend, "unmasked"):
            return backend.unmasked(q, view.keys, view.values)
        return super().attend(layer, q, view, positions, backend, window)

    def in_place(self, layer, positions, backend):
        """For a kernel that writes and reads this cache itself (kernels/cpu_fused_layer.cpp): its name and
        this cache's arguments after ``update``'s bookkeeping. None: a subclass, a backend not built in (it
        may see other keys) or K/V not in float32, which only update + attend serve."""
        if type(self) is not ContiguousKVCache or backend not in BACKENDS.values() or self.k.dtype != torch.float32:
            return None
        if positions is not self._step_positions:
            self._begin_step(positions)
        return "attn_cached", (self.k, self.v, layer, positions)

    def _begin_step(self, positions) -> None:
        """Check the positions and compute what every layer of this forward shares."""
        end = int(positions.max()) + 1
        if end > self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.max_len}); got up to {end - 1}")
        self._step_positions = positions
        self._same_positions = positions.shape[0] == 1 or bool((positions == positions[:1]).all())
        self._all_visible = positions.shape == (1, 1)
        self.lengths = positions.max(dim=1).values + 1            # sequential writes: valid = [0, last]
        self._visible = int(self.lengths.max())
        slots = self._slots[:self._visible]
        self._key_pos = torch.where(slots[None] < self.lengths[:, None], slots[None], -1)  # (B, S)

    def truncate(self, length: int) -> None:
        """Roll back to `length` tokens: later slots become invisible (and get overwritten)."""
        self.lengths = self.lengths.clamp(max=length)
        self._step_positions = None

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
