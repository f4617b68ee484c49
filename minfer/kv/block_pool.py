"""The block pool and the KV-cache manager: who owns which block of KV memory.

PagedAttention (Kwon et al., SOSP 2023) stores K/V in blocks of ``block_size`` tokens; a
sequence's *block table* maps its logical block i to a physical block. This module is the
bookkeeping (the memory is ``PagedKVCache`` in ``paged.py``): reference counts, prefix caching by
chained block hashes (LRU eviction of freed blocks), and copy-on-write after ``fork``. Out of
blocks is an answer, not an exception: ``allocate`` returns None and ``append_slots`` False,
with nothing changed. vLLM: ``vllm/v1/core/block_pool.py``, ``vllm/v1/core/kv_cache_manager.py``.
The diagram and the three ideas: docs/kv-and-attention.md.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from minfer.kv.block_table import BlockTableTensor
from minfer.validation import check_int

# The parent hash of a sequence's first block. A fixed number (vLLM draws a
# random one per process) so block hashes are the same in every run.
ROOT_HASH = 0x6D696E666572    # "minfer"


def hash_block_tokens(parent_hash: Optional[int], token_ids: Sequence[int]) -> int:
    """The prefix-cache key of one full block: hash(parent block's hash (None: the first block), its tokens),
    so the key names the whole prefix. A tuple of ints hashes the same in every process."""
    return hash((ROOT_HASH if parent_hash is None else parent_hash, tuple(token_ids)))


def block_hashes(token_ids: Sequence[int], block_size: int,
                 hash_fn: Callable[[Optional[int], Sequence[int]], int] = hash_block_tokens) -> list[int]:
    """Hashes of the *full* blocks of ``token_ids``, each chained to the one before (h1 = H(h0, t4..t7);
    drawn in docs/kv-and-attention.md)."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_fn(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


# --- The pool: blocks, reference counts, the free list, the prefix cache ---
@dataclass(slots=True)
class KVBlock:
    """Bookkeeping of one physical block (its K/V live in ``PagedKVCache``)."""

    block_id: int
    ref_cnt: int = 0                    # block tables holding this block
    block_hash: Optional[int] = None    # set while the block is findable in the prefix cache
    prefix: Optional[tuple] = None      # (parent's prefix, this block's tokens): the exact key


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` slots; the free list holds every block with ``ref_cnt == 0``,
    least recently freed first. A free block stays in the prefix cache until ``get_new_block`` hands it
    out (eviction); a cache hit on a free block takes it off the free list."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: Callable[[Optional[int], Sequence[int]], int] = hash_block_tokens):
        check_int(num_blocks, "num_blocks", lo=1)
        check_int(block_size, "block_size", lo=1)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}          # block hash -> block id
        self.num_evictions = 0                    # cached blocks reused for new contents

    def reserve_block(self) -> int:
        """Take one free block out of circulation for good (``num_blocks`` - 1): the static decode path's
        scratch block for padded rows (``engine/cuda_graph.py``; nano-vllm's store kernel skips slot -1)."""
        if not self.free_queue:
            raise ValueError("reserve_block: no free block left to reserve")
        block_id = self.get_new_block(last=True)             # at start-up: the highest id
        self.num_blocks -= 1
        return block_id

    @property
    def num_free_blocks(self) -> int:
        """Blocks no table holds (some may still be findable in the prefix cache)."""
        return len(self.free_queue)

    def get_new_block(self, last: bool = False) -> int:
        """Take the least recently freed block (``last``: the most recent), evict it from the prefix
        cache, ref_cnt = 1. The caller must check ``num_free_blocks`` first (``KVCacheManager`` does)."""
        block_id, _ = self.free_queue.popitem(last=last)
        block = self.blocks[block_id]
        if block.block_hash is not None:          # old contents are about to be overwritten
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.prefix = None, None
            self.num_evictions += 1
        block.ref_cnt = 1
        return block_id

    def touch(self, block_id: int) -> None:
        """One more table holds ``block_id`` (a cache hit or a fork)."""
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free_queue[block_id]         # a cached free block comes back to life
        block.ref_cnt += 1

    def free_block(self, block_id: int) -> None:
        """One table fewer holds ``block_id``; at 0 it joins the free list's end (most recent)."""
        block = self.blocks[block_id]
        if block.ref_cnt <= 0:
            raise ValueError(f"block {block_id} freed more often than it was allocated")
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block_id] = None

    def lookup(self, block_hash: int, prefix: tuple) -> Optional[int]:
        """The cached block holding exactly ``prefix`` (nested ``(parent prefix, tokens)``), or None: the hash
        finds it, the prefix confirms it (cheaply when the parent is the previous hit's very object)."""
        block_id = self.cached.get(block_hash)
        if block_id is None or self.blocks[block_id].prefix != prefix:
            return None
        return block_id

    def cache_block(self, block_id: int, block_hash: int, prefix: tuple) -> bool:
        """Make a full block findable. If another block already holds this prefix, keep that one."""
        if not self.enable_prefix_caching or block_hash in self.cached:
            return False
        block = self.blocks[block_id]
        if block.block_hash is not None:          # already cached (e.g. a shared hit)
            return False
        block.block_hash, block.prefix = block_hash, prefix
        self.cached[block_hash] = block_id
        return True


# --- Block-table arithmetic as plain functions (lesson 04's exercises in minfer/lessons/ex_paged.py) ---
def compute_slot_mapping(block_table: Sequence[int], block_size: int, start_pos: int,
                         num_tokens: int) -> list[int]:
    """Slots of positions [start_pos, start_pos + num_tokens): block_table[p // bs] * bs + p % bs."""
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start_pos, start_pos + num_tokens)]


def blocks_needed(num_tokens: int, num_new_tokens: int, num_held: int, block_size: int) -> int:
    """New blocks a sequence holding ``num_held`` blocks needs to grow by ``num_new_tokens``."""
    total = num_tokens + num_new_tokens
    return max(0, -(-total // block_size) - num_held)       # ceil(total / block_size) - held


# --- The manager: block tables of sequences ---
@dataclass(slots=True)
class SeqState:
    """What the manager knows about one sequence."""

    block_table: list[int]              # logical block i -> physical block id
    num_tokens: int                     # token slots reserved (prompt + appended)
    num_computed: int = 0               # tokens whose K/V are stored (committed)
    token_ids: list[int] = field(default_factory=list)   # known tokens: the prompt, then committed ones
    hashes: list[int] = field(default_factory=list)      # hash of each full, committed block
    prefixes: list[tuple] = field(default_factory=list)  # exact key of each of those blocks
    num_dropped: int = 0                # leading blocks given back: wholly outside a sliding window
    row: int = -1                       # this sequence's row in the manager's BlockTableTensor


@dataclass(slots=True)
class CacheUsage:
    """Capacity accounting of the pool at one moment (``KVCacheManager.usage``)."""

    num_blocks: int
    num_free_blocks: int         # on the free list (includes cached-but-free blocks)
    num_used_blocks: int         # held by at least one sequence
    num_cached_blocks: int       # findable by prefix hash (used or free)
    reserved_slots: int          # num_used_blocks * block_size
    used_slots: int              # slots of used blocks that hold (or will hold) a token
    num_seqs: int

    @property
    def fragmentation(self) -> float:
        """Internal fragmentation: the share of reserved slots that hold no token."""
        return 0.0 if self.reserved_slots == 0 else 1.0 - self.used_slots / self.reserved_slots


class KVCacheManager:
    """Block tables for many sequences over one ``BlockPool``.

    The life of a sequence (the engine's scheduler drives this, ``minfer/engine``)::

        n = mgr.allocate(sid, prompt)          # slots for the prompt; n tokens already cached
        ...forward prompt[n:] at slots mgr.slot_mapping(sid, n, len(prompt) - n)...
        mgr.commit_tokens(sid, prompt[n:])     # their K/V are stored: full blocks get hashed
        loop:  mgr.append_slots(sid, 1)        # a slot for the token just sampled
               ...forward it, then mgr.commit_tokens(sid, [token])...
        mgr.free(sid)                          # blocks go back; cached ones stay findable
    """

    def __init__(self, pool: BlockPool, device="cpu", group: int = 0):
        self.pool = pool
        self.root = group or None         # first block's parent: KV groups sharing a pool never share hashes
        self.block_size = pool.block_size
        self.seqs: dict[object, SeqState] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.tables = BlockTableTensor(device=device)   # every list below, mirrored as tensor rows

    def max_blocks(self, prompt_len: int, max_new: int, n: int = 1) -> int:
        """The most blocks one request holds at once: the engine refuses a request the pool can never fit.
        ``n`` > 1 samples share the prompt's full blocks and each copies the partial one (copy-on-write)."""
        bs = self.block_size
        if n > 1:
            return -(-prompt_len // bs) + n * (-(-max_new // bs) + 1) - 1
        return -(-(prompt_len + max_new) // bs)

    def row(self, seq_id) -> tuple[int, int]:
        """(row of ``seq_id`` in ``tables``, token slots reserved for it): what the runner indexes."""
        st = self._seq(seq_id)
        return st.row, st.num_tokens

    def _seq(self, seq_id) -> SeqState:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise ValueError(f"unknown seq_id {seq_id!r}: allocate it first") from None

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).block_table)

    def num_tokens(self, seq_id) -> int:
        """Token slots reserved for ``seq_id``."""
        return self._seq(seq_id).num_tokens

    def num_computed_tokens(self, seq_id) -> int:
        """Tokens of ``seq_id`` whose K/V are stored."""
        return self._seq(seq_id).num_computed

    def slot_mapping(self, seq_id, start_pos: int, num_tokens: int) -> list[int]:
        """Slots of positions [start_pos, start_pos + num_tokens): block_id * block_size + offset."""
        st = self._seq(seq_id)
        if start_pos < 0 or num_tokens < 0 or start_pos + num_tokens > st.num_tokens:
            raise ValueError(f"positions [{start_pos}, {start_pos + num_tokens}) of seq {seq_id!r} "
                             f"are not reserved (it has {st.num_tokens} slots)")
        return compute_slot_mapping(st.block_table, self.block_size, start_pos, num_tokens)

    def batch_slot_mapping(self, chunks: Sequence, tables, seq_of, positions):
        """(N,) slots of a flattened batch: ``tables`` (S, cols) its sequences' rows, ``seq_of`` (N,) each
        token's row, ``positions`` (N,); ``chunks`` for a manager with another layout (``prepare_batch``)."""
        bs = self.block_size
        return tables[seq_of, positions // bs] * bs + positions % bs

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies (src_block, dst_block) to perform, in order, before the next forward."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def _prefix_hits(self, token_ids: Sequence[int]) -> tuple[list[int], list[int], list[tuple]]:
        """Cached blocks holding the prompt's first full blocks -> (block ids, hashes, prefixes); at most
        (len - 1) // block_size: the last prompt token is always computed (its logits sample the next)."""
        if not self.pool.enable_prefix_caching:
            return [], [], []
        bs = self.block_size
        hits, hashes, prefixes = [], [], []
        parent_hash, parent_prefix = self.root, self.root
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = self.pool.hash_fn(parent_hash, tokens)
            block_id = self.pool.lookup(h, (parent_prefix, tokens))
            if block_id is None:
                break
            parent_prefix = self.pool.blocks[block_id].prefix   # the very object: next compare is O(bs)
            parent_hash = h
            hits.append(block_id)
            hashes.append(h)
            prefixes.append(parent_prefix)
        return hits, hashes, prefixes

    def allocate(self, seq_id, token_ids: Sequence[int], read_cache: bool = True) -> Optional[int]:
        """Reserve slots for a new sequence's prompt, reusing prefix-cached blocks (unless not ``read_cache``)
        -> prompt tokens whose K/V are cached already (skip their prefill), or None if the pool is short."""
        self._check_new(seq_id, token_ids)
        found = self._prefix_hits(token_ids) if read_cache else ([], [], [])
        if self.admit_cost(len(token_ids), found[0]) > self.pool.num_free_blocks:
            return None
        for b in found[0]:
            self.pool.touch(b)
        return self.admit(seq_id, token_ids, found)

    def _check_new(self, seq_id, token_ids: Sequence[int]) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"seq_id {seq_id!r} is already allocated")
        if len(token_ids) < 1:
            raise ValueError("token_ids is empty: a sequence needs at least one prompt token")

    def admit_cost(self, num_tokens: int, hits: Sequence[int], num_dropped: int = 0) -> int:
        """Free blocks that ``num_tokens`` slots take: new blocks, and the hits (from ``num_dropped`` on) revived."""
        revived = sum(1 for b in hits[num_dropped:] if self.pool.blocks[b].ref_cnt == 0)
        return blocks_needed(0, num_tokens, len(hits), self.block_size) + revived

    def admit(self, seq_id, token_ids: Sequence[int], found, num_tokens: Optional[int] = None,
              num_dropped: int = 0) -> int:
        """``allocate`` after its cost check and touches: ``found`` from ``_prefix_hits``; ``num_tokens`` slots."""
        hits, hashes, prefixes = found
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        table = hits + [self.pool.get_new_block() for _ in range(blocks_needed(0, num_tokens, len(hits),
                                                                               self.block_size))]
        self.seqs[seq_id] = SeqState(block_table=table, num_tokens=num_tokens, num_computed=len(hits) * self.block_size,
                                     token_ids=list(token_ids), hashes=hashes, prefixes=prefixes,
                                     num_dropped=num_dropped, row=self.tables.add_row(table))
        return len(hits) * self.block_size

    def can_append(self, seq_id, num_new_tokens: int = 1) -> bool:
        """Would ``append_slots(seq_id, num_new_tokens)`` succeed?"""
        return self._append_cost(self._seq(seq_id), num_new_tokens) <= self.pool.num_free_blocks

    def _needs_copy(self, st: SeqState, num_new_tokens: int) -> bool:
        """Copy-on-write: the next token goes into a partly filled block someone else holds too."""
        return (num_new_tokens > 0 and st.num_tokens % self.block_size != 0
                and self.pool.blocks[st.block_table[-1]].ref_cnt > 1)

    def _append_cost(self, st: SeqState, num_new_tokens: int) -> int:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        new = blocks_needed(st.num_tokens, num_new_tokens, len(st.block_table), self.block_size)
        return new + int(self._needs_copy(st, num_new_tokens))

    def append_slots(self, seq_id, num_new_tokens: int = 1) -> bool:
        """Reserve ``num_new_tokens`` more slots; False = out of blocks (nothing changed). A partly filled,
        shared last block (after ``fork``) is replaced by a copy first (``take_pending_copies``)."""
        st = self._seq(seq_id)
        if self._append_cost(st, num_new_tokens) > self.pool.num_free_blocks:
            return False
        changed = len(st.block_table)             # first table entry to mirror into ``tables``
        if self._needs_copy(st, num_new_tokens):
            src = st.block_table[-1]
            dst = self.pool.get_new_block()
            self._pending_copies.append((src, dst))
            self.pool.free_block(src)             # the other holders keep the original
            st.block_table[-1] = dst
            changed -= 1
        for _ in range(blocks_needed(st.num_tokens, num_new_tokens, len(st.block_table), self.block_size)):
            st.block_table.append(self.pool.get_new_block())
        self.tables.write(st.row, changed, st.block_table[changed:])
        st.num_tokens += num_new_tokens
        return True

    def commit_tokens(self, seq_id, token_ids: Sequence[int]) -> None:
        """The K/V of ``token_ids`` (the next tokens) are now stored; full blocks go to the prefix cache."""
        st = self._seq(seq_id)
        start, end = st.num_computed, st.num_computed + len(token_ids)
        if end > st.num_tokens:
            raise ValueError(f"seq {seq_id!r}: committing tokens up to position {end} but only "
                             f"{st.num_tokens} slots are reserved (call append_slots first)")
        known = st.token_ids[start:end]
        if list(token_ids[:len(known)]) != known:
            raise ValueError(f"seq {seq_id!r}: committed tokens differ from the prompt at "
                             f"positions [{start}, {start + len(known)})")
        st.token_ids.extend(token_ids[len(known):])
        st.num_computed = end
        bs = self.block_size
        while len(st.hashes) < st.num_computed // bs:  # a block just became full
            i = len(st.hashes)
            tokens = tuple(st.token_ids[i * bs:(i + 1) * bs])
            parent_hash = st.hashes[-1] if st.hashes else self.root
            prefix = (st.prefixes[-1] if st.prefixes else self.root, tokens)
            h = self.pool.hash_fn(parent_hash, tokens)
            st.hashes.append(h)
            st.prefixes.append(prefix)
            self.pool.cache_block(st.block_table[i], h, prefix)

    def fork(self, parent_id, child_id) -> None:
        """``child_id`` shares every block of ``parent_id`` (parallel sampling); all slots computed."""
        parent = self._seq(parent_id)
        if child_id in self.seqs:
            raise ValueError(f"seq_id {child_id!r} is already allocated")
        if parent.num_computed != parent.num_tokens:
            raise ValueError(f"seq {parent_id!r} has {parent.num_tokens - parent.num_computed} reserved "
                             f"slots not yet committed; fork after the forward that fills them")
        for b in parent.block_table[parent.num_dropped:]:
            self.pool.touch(b)
        self.seqs[child_id] = SeqState(block_table=list(parent.block_table), num_tokens=parent.num_tokens,
                                       num_computed=parent.num_computed, token_ids=list(parent.token_ids),
                                       hashes=list(parent.hashes), prefixes=list(parent.prefixes),
                                       num_dropped=parent.num_dropped, row=self.tables.add_row(parent.block_table))

    def drop_blocks_before(self, seq_id, pos: int) -> int:
        """Sliding window: give back the blocks holding only positions < ``pos`` -> how many. Their table
        entries stay (masked, never read). vLLM: ``SlidingWindowManager.remove_skipped_blocks``
        (``vllm/v1/core/single_type_kv_cache_manager.py``)."""
        st = self._seq(seq_id)
        upto = min(max(pos, 0) // self.block_size, len(st.block_table) - 1)   # never the block being written
        for b in st.block_table[st.num_dropped:upto]:
            self.pool.free_block(b)
        freed = max(upto - st.num_dropped, 0)
        st.num_dropped += freed
        return freed

    def free(self, seq_id) -> None:
        """Release the sequence's blocks, last block first, so the LRU evicts tails before shared heads."""
        st = self.seqs.pop(seq_id, None)
        if st is None:
            raise ValueError(f"unknown seq_id {seq_id!r}: nothing to free")
        for b in reversed(st.block_table[st.num_dropped:]):
            self.pool.free_block(b)
        self.tables.free_row(st.row)

    def usage(self) -> CacheUsage:
        """Blocks used/free/cached and the fragmentation of the reserved slots (shared blocks once)."""
        bs = self.block_size
        filled: dict[int, int] = {}
        for st in self.seqs.values():
            for i, b in enumerate(st.block_table[st.num_dropped:], st.num_dropped):
                filled[b] = max(filled.get(b, 0), min(bs, st.num_tokens - i * bs))
        return CacheUsage(num_blocks=self.pool.num_blocks, num_free_blocks=self.pool.num_free_blocks,
                          num_used_blocks=len(filled), num_cached_blocks=len(self.pool.cached),
                          reserved_slots=len(filled) * bs, used_slots=sum(filled.values()),
                          num_seqs=len(self.seqs))
