"""The block allocator: a stateful property test, plus hand-made cases for each rule.

The state machine drives a ``KVCacheManager`` with random allocate / prefill /
append / fork / free steps (prompts drawn to share prefixes, so prefix-cache
hits and LRU evictions happen all the time, on tiny pools that run out). A
fake KV store holds *token ids* instead of K/V vectors: every "forward" writes
each token's id at its slot, so reading a sequence back through its block
table must give exactly its tokens. After every step the invariants hold:

* free + used = total, and the free list is exactly the blocks nobody holds;
* each block's ref_cnt = the number of block tables that hold it;
* writes only go to blocks held by one sequence (so two live sequences never
  write the same slot; shared blocks are read-only);
* every sequence reads back its own tokens (prefix hits and copy-on-write
  included), and every cached block holds the tokens its hash names;
* running out of blocks is an answer (None / False) that changes nothing;
* the persistent block-table tensor holds every sequence's table in its own row.
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minfer.kv.block_pool import (BlockPool, KVCacheManager, block_hashes, compute_slot_mapping,
                                  hash_block_tokens)
from minfer.lessons.ex_paged import append_to_block_table, can_append_tokens
from minfer.lessons import exercises, grade, run


def _flatten(prefix) -> list[int]:
    """(parent prefix, tokens) nested tuples -> the whole token list."""
    parts = []
    while prefix is not None:
        prefix, tokens = prefix
        parts.append(tokens)
    return [t for tokens in reversed(parts) for t in tokens]


def weak_hash(parent_hash, tokens):
    """A hash that collides all the time: hits must still be confirmed by the tokens."""
    return sum(tokens) % 3


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 16), block_size=st.integers(1, 4), caching=st.booleans(),
                weak=st.booleans())
    def setup(self, num_blocks, block_size, caching, weak):
        self.bs = block_size
        self.pool = BlockPool(num_blocks, block_size, caching, hash_fn=weak_hash if weak else hash_block_tokens)
        self.mgr = KVCacheManager(self.pool)
        self.store = [None] * (num_blocks * block_size)      # slot -> token id (the fake K/V)
        self.tokens: dict[int, list[int]] = {}               # seq -> its known tokens
        self.written: dict[int, int] = {}                    # seq -> tokens whose "K/V" are stored
        self.reserved: dict[int, int] = {}                   # seq -> slots reserved
        self.history: list[list[int]] = [[0, 1, 2, 0, 1, 2, 0, 1]]
        self.next_id = 0

    # ------------------------------------------------------------ helpers
    def _snapshot(self):
        return copy.deepcopy((self.pool.blocks, list(self.pool.free_queue), self.pool.cached,
                              {s: (st.block_table, st.num_tokens, st.num_computed) for s, st in self.mgr.seqs.items()}))

    def _done(self):
        return [s for s in self.tokens if self.written[s] == self.reserved[s]]

    def _apply_copies(self):
        bs = self.bs
        for src, dst in self.mgr.take_pending_copies():
            self.store[dst * bs:(dst + 1) * bs] = self.store[src * bs:(src + 1) * bs]

    # ------------------------------------------------------------ rules
    @rule(data=st.data())
    def allocate(self, data):
        base = data.draw(st.sampled_from(self.history))
        keep = data.draw(st.integers(0, len(base)))
        prompt = (base[:keep] + data.draw(st.lists(st.integers(0, 2), max_size=4)))[:10] or [0]
        sid, self.next_id = self.next_id, self.next_id + 1
        before = self._snapshot()
        free_before = self.pool.num_free_blocks
        n = self.mgr.allocate(sid, prompt)
        if n is None:
            assert self._snapshot() == before, "a failed allocate changed the state"
            if not self.pool.enable_prefix_caching:
                assert -(-len(prompt) // self.bs) > free_before
            return
        assert n % self.bs == 0 and 0 <= n < len(prompt)
        if not self.pool.enable_prefix_caching:
            assert n == 0
        self.tokens[sid], self.written[sid], self.reserved[sid] = list(prompt), n, len(prompt)
        self.history.append(list(prompt))
        if data.draw(st.booleans(), label="prefill now"):
            self._write({sid: len(prompt) - n})

    @precondition(lambda self: any(self.written[s] < self.reserved[s] for s in self.tokens))
    @rule(data=st.data())
    def forward(self, data):
        """One flattened forward: a chunk of each chosen sequence's unwritten tokens."""
        pending = [s for s in self.tokens if self.written[s] < self.reserved[s]]
        chosen = data.draw(st.lists(st.sampled_from(pending), min_size=1, unique=True))
        self._write({s: data.draw(st.integers(1, self.reserved[s] - self.written[s])) for s in chosen})

    def _write(self, counts):
        """Write the next counts[s] tokens of each sequence s: one forward's K/V writes."""
        self._apply_copies()
        written_slots = set()
        for s, n in counts.items():
            start = self.written[s]
            slots = self.mgr.slot_mapping(s, start, n)
            for slot, tok in zip(slots, self.tokens[s][start:start + n]):
                block = self.pool.blocks[slot // self.bs]
                assert block.ref_cnt == 1, f"seq {s} writes into block {block.block_id} shared by {block.ref_cnt}"
                assert slot not in written_slots, f"slot {slot} written twice in one forward"
                written_slots.add(slot)
                self.store[slot] = tok
            self.mgr.commit_tokens(s, self.tokens[s][start:start + n])
            self.written[s] += n

    @precondition(lambda self: self._done())
    @rule(data=st.data(), n=st.integers(0, 5))
    def append(self, data, n):
        s = data.draw(st.sampled_from(self._done()))
        can = self.mgr.can_append(s, n)
        before = self._snapshot()
        ok = self.mgr.append_slots(s, n)
        assert ok == can, f"can_append said {can}, append_slots did {ok}"
        if not ok:
            assert self._snapshot() == before, "a failed append changed the state"
            return
        self._apply_copies()              # a driver performs them before the next forward
        self.tokens[s] += data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
        self.reserved[s] += n

    @precondition(lambda self: self._done())
    @rule(data=st.data())
    def fork(self, data):
        s = data.draw(st.sampled_from(self._done()))
        child, self.next_id = self.next_id, self.next_id + 1
        self.mgr.fork(s, child)
        self.tokens[child], self.written[child], self.reserved[child] = \
            list(self.tokens[s]), self.written[s], self.reserved[s]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(s)
        for d in (self.tokens, self.written, self.reserved):
            del d[s]

    # ------------------------------------------------------------ invariants
    @invariant()
    def block_table_tensor_mirrors_the_lists(self):
        for s, seq in self.mgr.seqs.items():
            assert self.mgr.tables.cpu[seq.row, :len(seq.block_table)].tolist() == seq.block_table, s
        assert len({seq.row for seq in self.mgr.seqs.values()}) == len(self.mgr.seqs)

    @invariant()
    def blocks_add_up(self):
        used = {b.block_id for b in self.pool.blocks if b.ref_cnt > 0}
        assert self.pool.num_free_blocks + len(used) == self.pool.num_blocks
        assert set(self.pool.free_queue) == {b.block_id for b in self.pool.blocks if b.ref_cnt == 0}

    @invariant()
    def refcounts_match_tables(self):
        holders = {}
        for s in self.tokens:
            table = self.mgr.block_table(s)
            assert len(set(table)) == len(table), f"seq {s} holds a block twice: {table}"
            assert len(table) == -(-self.reserved[s] // self.bs), "a table has too few or too many blocks"
            for b in table:
                holders[b] = holders.get(b, 0) + 1
        for b in self.pool.blocks:
            assert b.ref_cnt == holders.get(b.block_id, 0), f"block {b.block_id}: ref_cnt {b.ref_cnt}"

    @invariant()
    def every_sequence_reads_its_tokens(self):
        for s in self.tokens:
            assert self.mgr.num_tokens(s) == self.reserved[s]
            assert self.mgr.num_computed_tokens(s) == self.written[s]
            n = self.written[s]
            got = [self.store[slot] for slot in self.mgr.slot_mapping(s, 0, n)]
            assert got == self.tokens[s][:n], f"seq {s} reads {got}, wrote {self.tokens[s][:n]}"

    @invariant()
    def cached_blocks_hold_their_hash(self):
        bs = self.bs
        for h, bid in self.pool.cached.items():
            block = self.pool.blocks[bid]
            assert block.block_hash == h
            prefix = _flatten(block.prefix)
            assert len(prefix) % bs == 0 and prefix
            assert block_hashes(prefix, bs, self.pool.hash_fn)[-1] == h
            assert self.store[bid * bs:(bid + 1) * bs] == prefix[-bs:], f"cached block {bid} was overwritten"


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.filter_too_much])
test_allocator_state_machine = AllocatorMachine.TestCase


# ---------------------------------------------------------------- hand-made cases


def test_prefix_hit_skips_full_blocks_but_never_the_last_token():
    mgr = KVCacheManager(BlockPool(8, 4))
    a = list(range(10))
    assert mgr.allocate("a", a) == 0
    mgr.commit_tokens("a", a)                        # blocks 0 and 1 are full and cached
    assert len(mgr.pool.cached) == 2
    assert mgr.allocate("b", a[:8] + [99]) == 8      # both full blocks reused
    assert mgr.block_table("b")[:2] == mgr.block_table("a")[:2]
    assert mgr.allocate("c", a[:8]) == 4             # exactly 2 blocks: the last one is recomputed
    assert mgr.allocate("d", [5] + a[1:8]) == 0      # the first block differs: nothing matches
    assert mgr.pool.blocks[mgr.block_table("a")[0]].ref_cnt == 3


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_first():
    pool = BlockPool(5, 2)
    mgr = KVCacheManager(pool)
    for sid, toks in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])):
        mgr.allocate(sid, toks)
        mgr.commit_tokens(sid, toks)
    (a0, a1), (b0, b1) = mgr.block_table("a"), mgr.block_table("b")
    (never_used,) = pool.free_queue
    mgr.free("a")
    mgr.free("b")
    assert pool.num_free_blocks == 5 and len(pool.cached) == 4
    # free() releases tails first, so a sequence's tail is evicted before its head.
    assert list(pool.free_queue) == [never_used, a1, a0, b1, b0]
    assert mgr.allocate("c", [9]) == 0 and mgr.block_table("c") == [never_used]
    assert pool.num_evictions == 0
    assert mgr.allocate("d", [5, 6, 7, 8, 0]) == 4   # b is still cached: the hit revives its blocks
    assert mgr.block_table("d") == [b0, b1, a1]      # ... and the new block evicts a's tail
    assert pool.num_evictions == 1
    mgr.free("c")
    assert mgr.allocate("e", [1, 2, 3, 0]) == 2      # a's head survived
    assert mgr.block_table("e") == [a0, never_used]


def test_out_of_blocks_is_an_answer_and_changes_nothing():
    pool = BlockPool(3, 2)
    mgr = KVCacheManager(pool)
    assert mgr.allocate("a", [1] * 7) is None        # needs 4 blocks
    assert pool.num_free_blocks == 3 and not mgr.seqs
    assert mgr.allocate("a", [1] * 5) == 0           # 3 blocks
    assert not mgr.can_append("a", 2) and mgr.append_slots("a", 2) is False
    assert mgr.num_tokens("a") == 5 and mgr.block_table("a") == [0, 1, 2]
    assert mgr.append_slots("a", 1) is True          # fills the last block's free slot
    assert mgr.usage().fragmentation == 0.0


def test_fork_shares_blocks_and_copies_the_partial_block_on_first_write():
    pool = BlockPool(6, 4)
    mgr = KVCacheManager(pool)
    mgr.allocate("p", list(range(6)))                # blocks: one full, one with 2 of 4 slots used
    mgr.commit_tokens("p", list(range(6)))
    mgr.fork("p", "c1")
    mgr.fork("p", "c2")
    full, partial = mgr.block_table("p")
    assert pool.blocks[full].ref_cnt == 3 and pool.blocks[partial].ref_cnt == 3
    assert mgr.append_slots("c1", 1)                 # c1 writes first: gets a private copy
    (src, dst), = mgr.take_pending_copies()
    assert src == partial and mgr.block_table("c1") == [full, dst] and pool.blocks[partial].ref_cnt == 2
    assert mgr.append_slots("p", 1)
    assert mgr.take_pending_copies()[0][0] == partial
    assert mgr.append_slots("c2", 1)                 # the last holder writes in place, no copy
    assert mgr.take_pending_copies() == [] and mgr.block_table("c2") == [full, partial]
    assert pool.blocks[full].ref_cnt == 3            # full blocks stay shared, read-only


def test_usage_counts_shared_blocks_once():
    mgr = KVCacheManager(BlockPool(10, 4))
    mgr.allocate("a", list(range(5)))                # 2 blocks, 5 of 8 slots used
    mgr.commit_tokens("a", list(range(5)))
    mgr.fork("a", "b")
    u = mgr.usage()
    assert (u.num_used_blocks, u.reserved_slots, u.used_slots, u.num_seqs) == (2, 8, 5, 2)
    assert u.fragmentation == pytest.approx(3 / 8)


def test_bad_calls_name_the_problem():
    mgr = KVCacheManager(BlockPool(4, 2))
    with pytest.raises(ValueError, match="unknown seq_id"):
        mgr.append_slots("nope", 1)
    mgr.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already allocated"):
        mgr.allocate("a", [1])
    with pytest.raises(ValueError, match="not reserved"):
        mgr.slot_mapping("a", 2, 2)
    with pytest.raises(ValueError, match="slots not yet committed"):
        mgr.fork("a", "b")
    with pytest.raises(ValueError, match="differ from the prompt"):
        mgr.commit_tokens("a", [1, 9])
    with pytest.raises(ValueError, match="only 3 slots are reserved"):
        mgr.commit_tokens("a", [1, 2, 3, 4])
    with pytest.raises(ValueError, match="empty"):
        mgr.allocate("z", [])
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)


# ---------------------------------------------------------------- lesson 04's exercises

ENGINE = {
    "paged.slot_mapping": compute_slot_mapping,
    "paged.can_append": can_append_tokens,
    "paged.append_slots": append_to_block_table,
    "paged.block_hashes": block_hashes,
}


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_engine_passes_its_exercise(name):
    run(exercises.get(name), ENGINE[name], max_examples=200)


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_a_stub_fails_cleanly(name):
    def stub(*args):
        raise NotImplementedError
    result = grade(exercises.get(name), stub)
    assert result.status == "not_implemented" and "not implemented yet" in result.message


def test_a_hash_that_ignores_the_parent_is_explained():
    def no_chain(token_ids, block_size):
        return [hash_block_tokens(None, token_ids[i:i + block_size])
                for i in range(0, len(token_ids) - block_size + 1, block_size)]
    result = grade(exercises.get("paged.block_hashes"), no_chain)
    assert result.status == "wrong" and "ignores the parent" in result.message


def test_manager_slot_mapping_matches_the_exercise_reference():
    mgr = KVCacheManager(BlockPool(8, 3))
    mgr.allocate("x", list(range(4)))
    mgr.allocate("a", list(range(7)))
    assert mgr.slot_mapping("a", 2, 5) == compute_slot_mapping(mgr.block_table("a"), 3, 2, 5)


@given(num_tokens=st.integers(1, 30), new=st.integers(0, 30), free=st.integers(0, 10), bs=st.integers(1, 6))
@settings(max_examples=60, deadline=None)
def test_manager_append_matches_the_exercise_references(num_tokens, new, free, bs):
    """Without sharing, can_append / append_slots do exactly the exercises' arithmetic."""
    held = -(-num_tokens // bs)
    pool = BlockPool(held + free, bs)
    mgr = KVCacheManager(pool)
    mgr.allocate("a", [0] * num_tokens)
    mgr.commit_tokens("a", [0] * num_tokens)
    assert mgr.can_append("a", new) == can_append_tokens(num_tokens, held, new, free, bs)
    before = mgr.block_table("a")
    expected = append_to_block_table(before, num_tokens, new, list(pool.free_queue), bs)
    assert mgr.append_slots("a", new) == (expected is not None)
    assert mgr.block_table("a") == (expected if expected is not None else before)
