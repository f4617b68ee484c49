"""KV-cache groups over one block pool: the paged cache of a model with local and global layers.

*KV groups* of one window and equal size, each a ``KVCacheManager`` over ONE ``BlockPool``; local
groups give back the blocks behind their window. vLLM: ``vllm/v1/core/kv_cache_coordinator.py``
(``HybridKVCacheCoordinator``). Diagram: docs/kv-and-attention.md.
"""
import math
from typing import Optional, Sequence

from minfer.kv.block_pool import BlockPool, CacheUsage, KVCacheManager


def kv_cache_groups(cfg) -> list[tuple[Optional[int], list[int]]]:
    """(window, KV layers) of each KV group, global groups first; one group when all layers are alike."""
    if not cfg.is_hybrid:
        return [(cfg.window_of(0), list(range(cfg.num_kv_layers)))]
    if cfg.kv_share_group != 1:
        raise ValueError("a local/global paged cache needs kv_share_group = 1 (every layer its own K/V)")
    by_window: dict[Optional[int], list[int]] = {}
    for layer in range(cfg.num_hidden_layers):
        by_window.setdefault(cfg.window_of(layer), []).append(layer)
    size = math.gcd(*(len(layers) for layers in by_window.values()))
    return [(w, layers[i:i + size]) for w, layers in sorted(by_window.items(), key=lambda kv: kv[0] is not None)
            for i in range(0, len(layers), size)]


class KVCacheCoordinator:
    """One ``KVCacheManager`` per KV group (``windows``: each one's, None = global), all on ``pool``, behind
    a manager's interface. ``first_chunk`` (the step's token budget): what a local group reserves at
    admission beyond the prefix-cache hit."""

    def __init__(self, pool: BlockPool, windows: Sequence[Optional[int]], device="cpu", first_chunk: int = 512):
        self.pool, self.block_size, self.windows = pool, pool.block_size, list(windows)
        self.groups = [KVCacheManager(pool, device, group=g) for g in range(len(self.windows))]
        self.first_chunk = first_chunk

    @property
    def seqs(self) -> dict:
        return self.groups[0].seqs

    def row(self, seq_id) -> tuple[int, int]:
        """(row of ``seq_id``, the same in every group's table tensor; slots reserved in every group)."""
        return self.groups[0].row(seq_id)[0], self.num_tokens(seq_id)

    def num_tokens(self, seq_id) -> int:
        return min(g.num_tokens(seq_id) for g in self.groups)

    def num_computed_tokens(self, seq_id) -> int:
        return self.groups[0].num_computed_tokens(seq_id)

    def block_table(self, seq_id) -> list[int]:
        raise ValueError("a local/global model has one block table per KV group; "
                         "handing K/V blocks to another engine needs a model whose layers are alike")

    def take_pending_copies(self) -> list[tuple[int, int]]:
        return [c for g in self.groups for c in g.take_pending_copies()]

    def allocate(self, seq_id, token_ids: Sequence[int], read_cache: bool = True) -> Optional[int]:
        """``KVCacheManager.allocate`` for every group -> the hit all groups have, or None if the pool is
        short. A local group does not take back the hit blocks its window has already left."""
        self.groups[0]._check_new(seq_id, token_ids)
        found = [g._prefix_hits(token_ids) if read_cache else ([], [], []) for g in self.groups]
        hit = min(len(f[0]) for f in found)
        found = [tuple(x[:hit] for x in f) for f in found]
        computed, bs = hit * self.block_size, self.block_size
        plan = [(len(token_ids), 0) if w is None else                     # (slots reserved, hits left out)
                (min(len(token_ids), computed + self.first_chunk), min(max(computed - w + 1, 0) // bs, hit))
                for w in self.windows]
        cost = sum(g.admit_cost(n, f[0], skip) for g, (n, skip), f in zip(self.groups, plan, found))
        if cost > self.pool.num_free_blocks:
            return None
        for (_, skip), f in zip(plan, found):   # every hit first: a new block must not evict another group's hit
            for b in f[0][skip:]:
                self.pool.touch(b)
        for g, (n, skip), f in zip(self.groups, plan, found):
            g.admit(seq_id, token_ids, f, n, skip)
        assert len({g.seqs[seq_id].row for g in self.groups}) == 1, "group tables out of step"
        return computed

    def max_blocks(self, prompt_len: int, max_new: int, n: int = 1) -> int:
        """``KVCacheManager.max_blocks`` summed over the groups (a local one holds a window and a chunk)."""
        bs, total = self.block_size, prompt_len + max_new
        full = self.groups[0].max_blocks(prompt_len, max_new, n)           # a global group's bound
        return sum(full if w is None else n * min(-(-total // bs), -(-(w - 1 + self.first_chunk) // bs) + 1)
                   for w in self.windows)

    def append_slots(self, seq_id, num_new_tokens: int = 1) -> bool:
        """Every group grows to ``num_tokens + num_new_tokens`` slots; False (nothing changed) if short."""
        target = self.num_tokens(seq_id) + num_new_tokens
        grow = [max(0, target - g.num_tokens(seq_id)) for g in self.groups]
        if sum(g._append_cost(g._seq(seq_id), n) for g, n in zip(self.groups, grow)) > self.pool.num_free_blocks:
            return False
        for g, n in zip(self.groups, grow):
            g.append_slots(seq_id, n)
        return True

    def commit_tokens(self, seq_id, token_ids: Sequence[int]) -> None:
        """Every group commits; then local groups give back the blocks the next queries never read."""
        for g in self.groups:
            g.commit_tokens(seq_id, token_ids)
        next_pos = self.num_computed_tokens(seq_id)
        for g, w in zip(self.groups, self.windows):
            if w is not None:
                g.drop_blocks_before(seq_id, next_pos - w + 1)

    def fork(self, parent_id, child_id) -> None:
        for g in self.groups:
            g.fork(parent_id, child_id)

    def free(self, seq_id) -> None:
        for g in self.groups:
            g.free(seq_id)

    def usage(self) -> CacheUsage:
        """``KVCacheManager.usage`` summed over the groups (a block belongs to one group)."""
        parts = [g.usage() for g in self.groups]
        return CacheUsage(self.pool.num_blocks, self.pool.num_free_blocks, sum(u.num_used_blocks for u in parts),
                          len(self.pool.cached), sum(u.reserved_slots for u in parts),
                          sum(u.used_slots for u in parts), len(self.seqs))
