"""Paged attention for mixed batches: decodes together, each prefill chunk on its own.

``PagedKVCache``'s "gather" mode pads every sequence of the flattened batch to
the longest query and the longest context. That is fine when all sequences
are alike, but a continuous-batching step mixes them::

    31 decodes (1 query each) + one 512-token prefill chunk
    padded:  (32 seqs, 512 queries, 768 keys) scores per head: 97% of them padding

``SplitPagedKVCache`` keeps the same storage and slot mapping and splits the
attention of one forward into groups:

* decode groups: the sequences with a single query, bucketed by context length
  (buckets grow by a factor sqrt(2), so padding wastes less than 30% of a group), each bucket
  gathered into (D, nkv, S_max, hd) and run as one batched backend call
  (queries (D, nh, 1, hd));
* prefill chunks: one backend call each, queries (1, nh, T, hd) over that
  sequence's own context. A chunk starting at position 0 needs no gather at all:
  its keys are exactly the keys computed in this forward (plain causal attention).

vLLM's CPU backend did the same split (``vllm/attention/backends/torch_sdpa.py``:
prefills through SDPA one sequence at a time, decodes through the paged kernel);
its GPU backends avoid it with a variable-length FlashAttention kernel
(``cu_seqlens``), which plain PyTorch does not have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minfer.attention.mask import allowed
from minfer.attention.sdpa import sdpa, sdpa_attention
from minfer.kv.paged import PagedBatch, PagedKVCache


@dataclass
class _Group:
    rows: torch.Tensor          # (T_total,) rows of the flattened batch whose queries belong to this group
    q_pos: torch.Tensor         # (G, T) query positions
    k_pos: torch.Tensor         # (G, S) key positions, -1 = padding
    k_slots: torch.Tensor | None  # (G * S,) slots to gather, None = keys are this forward's own (prefill from 0)
    num_seqs: int
    fresh: slice | None = None  # for a prefill from position 0: its columns in this forward's k/v
    sdpa_mask: torch.Tensor | None = None   # (G, 1, T, S) visibility for the SDPA fast path (None: all/causal)


class SplitPagedKVCache(PagedKVCache):
    """``PagedKVCache`` whose ``attend`` runs decodes batched and prefill chunks one by one."""

    def set_batch(self, meta: PagedBatch) -> None:
        device, bs = self.k.device, self.block_size
        self.meta = meta
        self.groups: list[_Group] = []
        start, decodes = 0, []
        for s, (qlen, slen, table) in enumerate(zip(meta.query_lens, meta.seq_lens, meta.block_tables)):
            if qlen == 1:
                decodes.append((start, slen, table))
            else:
                first = slen - qlen                                       # position of the chunk's first token
                q_pos = torch.arange(first, slen, device=device)[None]    # (1, T)
                if first == 0:                                            # whole context is in this forward
                    self.groups.append(_Group(torch.arange(start, start + qlen, device=device), q_pos, q_pos,
                                              None, 1, slice(start, start + qlen)))
                else:
                    pos = torch.arange(slen)
                    slots = torch.tensor(table)[pos // bs] * bs + pos % bs
                    self.groups.append(_Group(torch.arange(start, start + qlen, device=device), q_pos,
                                              pos[None].to(device), slots.to(device), 1))
            start += qlen
        # Decodes, bucketed by context length in steps of sqrt(2): padding wastes < 30% of a group
        # (coarser buckets pad more, finer ones make more backend calls; measured on SmolLM2 CPU).
        buckets: dict[int, list] = {}
        for d in decodes:
            buckets.setdefault(int(2 * math.log2(d[1])), []).append(d)
        for _, group in sorted(buckets.items()):
            smax = max(slen for _, slen, _ in group)
            pos = torch.arange(smax)
            slots = torch.zeros(len(group), smax, dtype=torch.long)
            k_pos = torch.full((len(group), smax), -1, dtype=torch.long)
            for i, (_, slen, table) in enumerate(group):
                p = pos[:slen]
                slots[i, :slen] = torch.tensor(table)[p // bs] * bs + p % bs
                k_pos[i, :slen] = p
            rows = torch.tensor([r for r, _, _ in group])
            q_pos = torch.tensor([[slen - 1] for _, slen, _ in group])
            self.groups.append(_Group(rows.to(device), q_pos.to(device), k_pos.to(device),
                                      slots.flatten().to(device), len(group)))
        for g in self.groups:       # masks computed once per forward, not once per layer
            if g.fresh is None and bool((g.k_pos < 0).any() or g.q_pos.shape[1] > 1):
                g.sdpa_mask = allowed(g.q_pos, g.k_pos)[:, None]

    def attend(self, layer: int, q: torch.Tensor, shared_kv, positions: torch.Tensor, backend,
               window: int | None = None) -> torch.Tensor:
        """q (1, nh, N, hd) -> (1, nh, N, hd), one backend call per group."""
        self._need_meta(positions)
        new_k, new_v, _ = shared_kv                                        # (1, nkv, N, hd) this forward's K/V
        nkv, hd = self.k.shape[3], self.k.shape[4]
        out = torch.empty_like(q)
        for g in self.groups:
            G = g.num_seqs
            qg = q[0][:, g.rows].reshape(q.shape[1], G, -1, hd).transpose(0, 1)      # (G, nh, T, hd)
            if g.k_slots is None:
                keys, values = new_k[:, :, g.fresh], new_v[:, :, g.fresh]           # (1, nkv, T, hd)
            else:
                S = g.k_pos.shape[1]
                keys = self.k[layer].view(-1, nkv, hd).index_select(0, g.k_slots)
                values = self.v[layer].view(-1, nkv, hd).index_select(0, g.k_slots)
                keys = keys.view(G, S, nkv, hd).transpose(1, 2).to(q.dtype)         # (G, nkv, S, hd)
                values = values.view(G, S, nkv, hd).transpose(1, 2).to(q.dtype)
            if backend is sdpa_attention and window is None:
                # The SDPA backend's own logic, with the mask computed once per forward (set_batch).
                if g.fresh is not None:                                              # prefill from 0
                    o = sdpa(qg, keys, values, is_causal=True)
                else:
                    o = sdpa(qg, keys, values, attn_mask=g.sdpa_mask)
            else:
                o = backend(qg, keys, values, g.q_pos, g.k_pos, window=window)       # (G, nh, T, hd)
            out[0][:, g.rows] = o.transpose(0, 1).reshape(q.shape[1], -1, hd)
        return out
