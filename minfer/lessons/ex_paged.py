"""Exercises of lesson 04 (paged attention): block-table arithmetic and the prefix-cache hash.

``can_append_tokens`` and ``append_to_block_table`` below are the allocator's rules as plain functions
(``KVCacheManager`` applies them with sharing). Inputs are tuples: a function cannot edit them in place.
"""
from typing import Any, Optional, Sequence

from hypothesis import strategies as st

from minfer.kv.block_pool import blocks_needed, hash_block_tokens
from minfer.lessons.registry import Exercise, Inputs, register, returned


def can_append_tokens(num_tokens: int, num_blocks_held: int, num_new_tokens: int,
                      num_free_blocks: int, block_size: int) -> bool:
    """Do ``num_new_tokens`` more tokens fit, given the free blocks? (No sharing: see ``KVCacheManager``.)"""
    return blocks_needed(num_tokens, num_new_tokens, num_blocks_held, block_size) <= num_free_blocks


def append_to_block_table(block_table: Sequence[int], num_tokens: int, num_new_tokens: int,
                          free_blocks: Sequence[int], block_size: int) -> Optional[list[int]]:
    """The block table after growing by ``num_new_tokens``, taking blocks from the front of
    ``free_blocks``; None (and no change) if there are not enough."""
    need = blocks_needed(num_tokens, num_new_tokens, len(block_table), block_size)
    if need > len(free_blocks):
        return None
    return list(block_table) + list(free_blocks[:need])


def _as_int_list(actual: Any, what: str) -> tuple[Optional[list[int]], Optional[str]]:
    """``actual`` as a list of ints, or an explanation of why it is not one."""
    if hasattr(actual, "tolist"):                      # a tensor or numpy array is fine too
        actual = actual.tolist()
    if not isinstance(actual, (list, tuple)) or not all(isinstance(x, int) for x in actual):
        return None, returned(actual, what, show=True)
    return list(actual), None


@st.composite
def _slot_mapping_inputs(draw) -> Inputs:
    block_size = draw(st.integers(1, 8))
    n_blocks = draw(st.integers(1, 6))
    table = draw(st.permutations(range(2 * n_blocks)))[:n_blocks]   # distinct physical blocks
    capacity = n_blocks * block_size
    start = draw(st.integers(0, capacity - 1))
    num = draw(st.integers(1, capacity - start))
    return {"block_table": tuple(table), "block_size": block_size, "start_pos": start, "num_tokens": num}


def _compare_slots(inputs: Inputs, expected: list[int], actual: Any) -> Optional[str]:
    got, problem = _as_int_list(actual, f"a list of {len(expected)} slot numbers")
    if problem:
        return problem
    if len(got) != len(expected):
        return f"returned {len(got)} slots, expected one per token: {len(expected)}"
    bs, table = inputs["block_size"], inputs["block_table"]
    for i, (e, a) in enumerate(zip(expected, got)):
        if e != a:
            p = inputs["start_pos"] + i
            return (f"position {p} is in logical block {p} // {bs} = {p // bs}, physical block "
                    f"block_table[{p // bs}] = {table[p // bs]}, offset {p} % {bs} = {p % bs}: "
                    f"slot {table[p // bs]} * {bs} + {p % bs} = {e}; yours is {a}")
    return None


register(Exercise(
    name="paged.slot_mapping",
    lesson="04_paged_attention", function="slot_mapping",
    description=("slot_mapping(block_table, block_size, start_pos, num_tokens) -> the slot of each "
                 "position in [start_pos, start_pos + num_tokens): block_id * block_size + offset"),
    reference="minfer.kv.block_pool:compute_slot_mapping",
    inputs=_slot_mapping_inputs(),
    compare=_compare_slots,
))


@st.composite
def _can_append_inputs(draw) -> Inputs:
    block_size = draw(st.integers(1, 8))
    num_tokens = draw(st.integers(0, 40))
    held = -(-num_tokens // block_size)                 # exactly the blocks those tokens fill
    return {"num_tokens": num_tokens, "num_blocks_held": held,
            "num_new_tokens": draw(st.integers(0, 20)), "num_free_blocks": draw(st.integers(0, 6)),
            "block_size": block_size}


def _compare_bool(inputs: Inputs, expected: bool, actual: Any) -> Optional[str]:
    if not isinstance(actual, bool):
        return f"returned {type(actual).__name__} {actual!r}, expected True or False"
    if actual == expected:
        return None
    n, held, new, bs = (inputs[k] for k in ("num_tokens", "num_blocks_held", "num_new_tokens", "block_size"))
    total = n + new
    need = max(0, -(-total // bs) - held)
    return (f"{n} + {new} = {total} tokens need ceil({total} / {bs}) = {-(-total // bs)} blocks; "
            f"{held} are held, so {need} new ones, and {inputs['num_free_blocks']} are free: "
            f"expected {expected}")


register(Exercise(
    name="paged.can_append",
    lesson="04_paged_attention", function="can_append",
    description=("can_append(num_tokens, num_blocks_held, num_new_tokens, num_free_blocks, block_size) "
                 "-> True if the new tokens fit in the held blocks plus the free ones"),
    reference="minfer.lessons.ex_paged:can_append_tokens",
    inputs=_can_append_inputs(),
    compare=_compare_bool,
))


@st.composite
def _append_inputs(draw) -> Inputs:
    block_size = draw(st.integers(1, 6))
    num_tokens = draw(st.integers(0, 20))
    held = -(-num_tokens // block_size)
    ids = draw(st.permutations(range(held + 6)))
    free = ids[held:held + draw(st.integers(0, 6))]
    return {"block_table": tuple(ids[:held]), "num_tokens": num_tokens,
            "num_new_tokens": draw(st.integers(0, 16)), "free_blocks": tuple(free),
            "block_size": block_size}


def _compare_append(inputs: Inputs, expected: Optional[list[int]], actual: Any) -> Optional[str]:
    if expected is None:
        if actual is None:
            return None
        return (f"the new tokens need more blocks than the {len(inputs['free_blocks'])} free ones: "
                f"return None (out of blocks), not {actual!r}")
    if actual is None:
        return f"there are enough free blocks: expected the new block table {expected}, yours is None"
    got, problem = _as_int_list(actual, "the new block table (a list of block ids) or None")
    if problem:
        return problem
    if got[:len(inputs["block_table"])] != list(inputs["block_table"]):
        return "the new block table must start with the old one, unchanged"
    if got != expected:
        total = inputs["num_tokens"] + inputs["num_new_tokens"]
        return (f"{total} tokens need {-(-total // inputs['block_size'])} blocks in all, taken in order "
                f"from the front of free_blocks: expected {expected}, yours {got}")
    return None


register(Exercise(
    name="paged.append_slots",
    lesson="04_paged_attention", function="append_slots",
    description=("append_slots(block_table, num_tokens, num_new_tokens, free_blocks, block_size) -> "
                 "the grown block table (new blocks from the front of free_blocks), or None if they do not fit"),
    reference="minfer.lessons.ex_paged:append_to_block_table",
    inputs=_append_inputs(),
    compare=_compare_append,
))


def _compare_hashes(inputs: Inputs, expected: list[int], actual: Any) -> Optional[str]:
    got, problem = _as_int_list(actual, f"a list of {len(expected)} hashes")
    if problem:
        return problem
    tokens, bs = inputs["token_ids"], inputs["block_size"]
    if len(got) != len(expected):
        return (f"{len(tokens)} tokens make {len(expected)} full blocks of {bs}; only full blocks are "
                f"hashed (a partly filled block can still change), but you returned {len(got)} hashes")
    for i, (e, a) in enumerate(zip(expected, got)):
        if e != a:
            block = tokens[i * bs:(i + 1) * bs]
            if i == 0:
                hint = f"the first block has no parent: hash_block_tokens(None, {block})"
            elif a == hash_block_tokens(None, block):
                hint = (f"block {i} must chain to its parent: hash_block_tokens(hash of block {i - 1}, "
                        f"{block}); yours ignores the parent")
            else:
                hint = f"expected hash_block_tokens(hash of block {i - 1}, {block})"
            return f"hash {i} differs: {hint}"
    return None


register(Exercise(
    name="paged.block_hashes",
    lesson="04_paged_attention", function="block_hashes",
    prelude="import math\nfrom minfer.kv.block_pool import hash_block_tokens\n",
    allowed=("minfer.kv.block_pool:hash_block_tokens",),
    description=("block_hashes(token_ids, block_size) -> [hash of each FULL block], each "
                 "hash_block_tokens(parent block's hash or None, the block's tokens)"),
    reference="minfer.kv.block_pool:block_hashes",
    inputs=st.builds(dict, token_ids=st.lists(st.integers(0, 9), max_size=12).map(tuple),
                     block_size=st.integers(1, 4)),
    compare=_compare_hashes,
))
