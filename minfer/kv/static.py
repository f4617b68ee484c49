"""The static contiguous cache: the single-request loop with fixed shapes (gpt-fast's decode step).

``ContiguousKVCache`` reads the positions on the host (``int(positions.max())``) to
slice out the valid keys, so every decode step has a new shape. A CUDA graph or a
compiled step cannot do that: a graph replays the shapes it recorded, and a host read
inside a capture is an error. ``StaticKVCache`` keeps the same buffers but lets every
forward attend over ALL ``max_len`` slots, hiding the slots after each query by a
mask the attention backend builds on the device (``sdpa_attention`` reads nothing on the host)::

    max_len 8, decode at position 4:      slots  0 1 2 3 4 5 6 7
                                          mask   x x x x x . . .    (slot j visible iff j <= 4)

The slots after the query are zeros or stale keys of a longer past; the mask hides
them, so nothing has to be cleared and the step has one shape from the first token to
the last. The cost: attention reads ``max_len`` keys per step instead of the valid
ones. gpt-fast's ``KVCache`` (``model.py``) and its ``causal_mask[input_pos]`` are this
design; the single-request loop uses it with ``generate_tokens(kv_cache="static")``,
which replays the decode step as a CUDA graph on a GPU (``minfer/engine/cuda_graph.py``).
"""
from __future__ import annotations

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
