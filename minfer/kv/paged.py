"""The paged KV cache: one pool of K/V blocks shared by every sequence in the batch.

Memory layout (vLLM's flash-attention layout, ``vllm/v1/attention/backends/flash_attn.py``)::

    k, v   (num_kv_layers, num_blocks, block_size, n_kv_heads, head_dim)
    slot   = block_id * block_size + offset        a token's row in k[layer].view(-1, nkv, hd)

The model runs on a *flattened batch*: the tokens of several sequences (a
prefill chunk of one, a single decode token of another, ...) side by side in
``input_ids (1, N)`` with ``positions (1, N)``. ``PagedBatch`` says which
tokens belong to which sequence and where their K/V go::

    seq A: prefill of 3 tokens at positions 0..2   seq B: decode 1 token at position 5
    input_ids     [a0 a1 a2 | b5]                  query_lens [3, 1]   seq_lens [3, 6]
    slot_mapping  [ 8  9 10 | 21]                  logits_indices [2, 3]
    block_tables  A: [2]      B: [0, 5]            (block_size 4: b5 -> block 5, offset 1)

Each layer calls ``update`` (write the N new keys/values at their slots, one
scatter for the whole batch) and then ``attend``, which runs attention for
each sequence through its block table, one of two ways:

* ``"gather"``: copy the sequence's K/V out of the pool into a contiguous
  (padded) tensor and call the ordinary attention backend on it. Simple, and
  the backend may be a fused kernel; costs one copy of the context per layer.
* ``"online"``: walk the block table one block at a time and fold each block
  into FlashAttention's online-softmax recurrence
  (``attention.flash.online_softmax_update``). The contiguous copy is never
  built: this is what the PagedAttention CUDA kernel does
  (vLLM: ``csrc/attention/paged_attention_v1.cu``), written as a Python loop.

Both are tested equal to contiguous attention. The bookkeeping (block tables,
slot mapping, prefix caching, copy-on-write) lives in ``block_pool.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from minfer.attention.flash import online_softmax_update
from minfer.attention.mask import allowed
from minfer.kv.block_pool import KVCacheManager

ATTENTION_MODES = ("gather", "online")


@dataclass
class PagedBatch:
    """Attention metadata of one forward over a flattened batch of N tokens from S sequences."""

    seq_ids: list                       # (S,) which sequences, in the order their tokens appear
    query_lens: list[int]               # (S,) tokens of each sequence in this forward
    seq_lens: list[int]                 # (S,) context length of each after this forward
    block_tables: list[list[int]]       # (S, blocks of each) physical block ids
    slot_mapping: torch.Tensor          # (N,) long: where each new token's K/V is written
    logits_indices: torch.Tensor        # (S,) long: each sequence's last token in the batch
    positions: torch.Tensor             # (1, N) long: absolute position of each token

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())

    @classmethod
    def build(cls, manager: KVCacheManager, chunks: Sequence[tuple], device="cpu") -> "PagedBatch":
        """From ``[(seq_id, start_pos, num_tokens), ...]``: positions [start, start + n) of each sequence.

        The slots must be reserved already (``allocate`` / ``append_slots``).
        """
        if not chunks:
            raise ValueError("a PagedBatch needs at least one (seq_id, start_pos, num_tokens)")
        seq_ids, qlens, slens, tables, slots, positions = [], [], [], [], [], []
        for seq_id, start, n in chunks:
            if n < 1:
                raise ValueError(f"seq {seq_id!r}: num_tokens must be >= 1, got {n}")
            seq_ids.append(seq_id)
            qlens.append(n)
            slens.append(start + n)
            tables.append(manager.block_table(seq_id))
            slots += manager.slot_mapping(seq_id, start, n)
            positions += range(start, start + n)
        ends = torch.tensor(qlens).cumsum(0) - 1
        return cls(seq_ids=seq_ids, query_lens=qlens, seq_lens=slens, block_tables=tables,
                   slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                   logits_indices=ends.to(device),
                   positions=torch.tensor(positions, dtype=torch.long, device=device)[None])


class PagedKVCache:
    """K/V storage in blocks, plus attention through block tables (see the module docstring)."""

    def __init__(self, cfg, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 device="cpu", attention_mode: str = "gather"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
        self.cfg = cfg
        self.num_blocks, self.block_size = num_blocks, block_size
        self.attention_mode = attention_mode
        L, nkv, hd = cfg.num_kv_layers, cfg.num_key_value_heads, cfg.head_dim
        shape = (L, num_blocks, block_size, nkv, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # (L, num_blocks, block_size, nkv, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.meta: PagedBatch | None = None

    # ------------------------------------------------------------ sizes
    @staticmethod
    def bytes_per_block(cfg, block_size: int, dtype=torch.float32) -> int:
        """K and V bytes of one block across all KV layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_kv_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    @classmethod
    def num_blocks_for_memory(cls, cfg, memory_bytes: float, block_size: int, dtype=torch.float32) -> int:
        """How many blocks fit in a memory budget."""
        return int(memory_bytes // cls.bytes_per_block(cfg, block_size, dtype))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    # ------------------------------------------------------------ per-forward metadata
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: for each (src, dst), in order, block dst becomes a copy of block src (all layers)."""
        for src, dst in pairs:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def set_batch(self, meta: PagedBatch) -> None:
        """Install the metadata of the next forward; precompute the index tensors every layer reuses."""
        device = self.k.device
        S, bs = len(meta.seq_ids), self.block_size
        T = max(meta.query_lens)
        # Queries, padded per sequence: q_index[s, t] = row of token t of sequence s in the batch.
        starts = [0]
        for n in meta.query_lens[:-1]:
            starts.append(starts[-1] + n)
        t = torch.arange(T, device=device)
        qlens = torch.tensor(meta.query_lens, device=device)
        self._q_valid = t[None] < qlens[:, None]                                    # (S, T)
        self._q_index = (torch.tensor(starts, device=device)[:, None] + t[None]).masked_fill(~self._q_valid, 0)
        self._q_pos = meta.positions[0][self._q_index].masked_fill(~self._q_valid, -1)   # (S, T), -1 sees nothing
        # Keys: sequence s sees positions 0 .. seq_len-1, stored via its block table.
        n_blocks = max(len(tb) for tb in meta.block_tables)
        tables = torch.zeros(S, n_blocks, dtype=torch.long)
        for s, tb in enumerate(meta.block_tables):
            tables[s, :len(tb)] = torch.tensor(tb, dtype=torch.long)
        self._tables = tables.to(device)                                            # (S, max blocks)
        slens = torch.tensor(meta.seq_lens, device=device)
        self._seq_lens = slens
        Smax = max(meta.seq_lens)
        pos = torch.arange(Smax, device=device)
        self._k_pos = torch.where(pos[None] < slens[:, None], pos[None], -1)        # (S, Smax), -1 = padding
        blk = self._tables[:, :(Smax + bs - 1) // bs]
        self._k_slots = (blk[:, pos // bs] * bs + pos % bs).masked_fill(self._k_pos < 0, 0)  # (S, Smax)
        self.meta = meta

    def _need_meta(self, positions: torch.Tensor) -> PagedBatch:
        meta = self.meta
        if meta is None:
            raise ValueError("PagedKVCache: call set_batch(PagedBatch) before the forward")
        if positions.dim() != 2 or positions.shape[0] != 1 or positions.shape[1] != meta.num_tokens:
            raise ValueError(f"PagedKVCache expects a flattened batch (1, {meta.num_tokens}) as set by "
                             f"set_batch; got positions of shape {tuple(positions.shape)}")
        return meta

    # ------------------------------------------------------------ the cache interface
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v (1, nkv, N, hd) at ``meta.slot_mapping``; returns them for ``attend``."""
        meta = self._need_meta(positions)
        nkv, hd = k.shape[1], k.shape[3]
        self.k[layer].view(-1, nkv, hd).index_copy_(0, meta.slot_mapping, k[0].transpose(0, 1).to(self.k.dtype))
        self.v[layer].view(-1, nkv, hd).index_copy_(0, meta.slot_mapping, v[0].transpose(0, 1).to(self.v.dtype))
        return k, v, positions

    def truncate(self, length: int) -> None:
        raise NotImplementedError("PagedKVCache has no single length to roll back to; a scheduler "
                                  "shrinks a sequence through its KVCacheManager instead")

    def attend(self, layer: int, q: torch.Tensor, shared_kv, positions: torch.Tensor, backend,
               window: int | None = None) -> torch.Tensor:
        """Attention of the N queries q (1, nh, N, hd) over each one's sequence -> (1, nh, N, hd)."""
        self._need_meta(positions)
        nh, N, hd = q.shape[1], q.shape[2], q.shape[3]
        S = self._q_index.shape[0]
        if S == 1:                                            # one sequence: no padding needed
            qp, q_pos = q, positions                          # (1, nh, T, hd), (1, T)
        else:
            qp = q[0].transpose(0, 1)[self._q_index].transpose(1, 2)                # (S, nh, T, hd)
            q_pos = self._q_pos                                                     # (S, T), same every layer
        if self.attention_mode == "gather":
            out = self._attend_gather(layer, qp, q_pos, backend, window)
        else:
            out = self._attend_online(layer, qp, q_pos, window)
        if S == 1:
            return out
        return out.transpose(1, 2)[self._q_valid].transpose(0, 1)[None]           # (1, nh, N, hd)

    def _attend_gather(self, layer, q, q_pos, backend, window):
        """Gather each sequence's K/V into (S, nkv, Smax, hd), then call the attention backend."""
        nkv, hd = self.k.shape[3], self.k.shape[4]
        keys = self.k[layer].view(-1, nkv, hd)[self._k_slots].transpose(1, 2)     # (S, nkv, Smax, hd)
        values = self.v[layer].view(-1, nkv, hd)[self._k_slots].transpose(1, 2)
        return backend(q, keys.to(q.dtype), values.to(q.dtype), q_pos, self._k_pos, window=window)

    def _attend_online(self, layer, q, q_pos, window):
        """PagedAttention's loop: for each logical block j, fold block_tables[:, j] into the softmax."""
        S, nh, T, hd = q.shape
        nkv, bs = self.k.shape[3], self.block_size
        g = nh // nkv
        scale = 1.0 / math.sqrt(hd)
        qg = q.float().reshape(S, nkv, g, T, hd)                                   # query heads grouped per K/V head
        m = torch.full((S, nkv, g, T, 1), float("-inf"), device=q.device)          # running max
        l = torch.zeros_like(m)                                                     # running sum
        acc = torch.zeros_like(qg)                                                  # unnormalised output
        offsets = torch.arange(bs, device=q.device)
        n_blocks = (int(max(self.meta.seq_lens)) + bs - 1) // bs
        for j in range(n_blocks):
            block_ids = self._tables[:, j]                                          # (S,)
            k_pos = j * bs + offsets                                                # (bs,)
            k_pos = torch.where(k_pos[None] < self._seq_lens[:, None], k_pos[None], -1)   # (S, bs)
            visible = allowed(q_pos, k_pos, window)                                 # (S, T, bs)
            if not bool(visible.any()):                                             # e.g. outside the window
                continue
            kb = self.k[layer, block_ids].float().permute(0, 2, 1, 3)[:, :, None]   # (S, nkv, 1, bs, hd)
            vb = self.v[layer, block_ids].float().permute(0, 2, 1, 3)[:, :, None]
            scores = (qg @ kb.transpose(-1, -2)) * scale                            # (S, nkv, g, T, bs)
            scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, vb)
        out = acc / l.clamp_min(torch.finfo(l.dtype).tiny)                          # rows with no key stay 0
        return out.reshape(S, nh, T, hd).to(q.dtype)
