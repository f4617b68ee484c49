"""Batch metadata without per-sequence Python in the hot path (issue 13, item 4).

* Decode attention is one backend call per layer whatever the batch size (1, 8, 32 with
  ragged context lengths), counted by a wrapper around the reference backend; each
  prefill chunk still gets its own call.
* Those logits equal the oracle's: the model run on each whole sequence without a cache.
* ``prepare_batch``'s vectorized positions / slot mapping / block tables equal the
  per-sequence list formulas (``compute_slot_mapping``) on random block managers,
  and the persistent block-table tensor equals the manager's lists after any
  sequence of allocate / append (with copy-on-write) / fork / free.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import describe_diff, tiny_config, tiny_model

from minfer.attention import reference_attention
from minfer.engine.runner import ModelRunner, prepare_batch
from minfer.kv.block_pool import BlockPool, KVCacheManager, compute_slot_mapping


class CountingBackend:
    """The reference backend, recording the batch size (q.shape[0]) and query length of each call."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, q, k, v, q_pos, k_pos, window=None, scale=None):
        self.calls.append((q.shape[0], q.shape[2]))
        return reference_attention(q, k, v, q_pos, k_pos, window=window, scale=scale)


class _Req:
    def __init__(self, rid, tokens):
        self.request_id, self.all_token_ids = rid, tokens


class _Chunk:
    def __init__(self, req, start, n):
        self.request, self.start, self.num_tokens = req, start, n


def _runner_with_contexts(lengths, mode, block_size=4, layers=3, seed=0, spare=2, decode_kernel="torch"):
    """A runner whose sequences hold ``lengths`` tokens of K/V (prefilled), plus one more reserved.
    With a decode kernel the backend is SDPA (what the kernel replaces), and the counter counts nothing."""
    cfg = tiny_config(num_hidden_layers=layers)
    model = tiny_model(cfg, seed=seed)
    counter = CountingBackend()
    blocks = sum(-(-(n + 1) // block_size) for n in lengths) + spare
    runner = ModelRunner(model, blocks, block_size, enable_prefix_caching=False,
                         attention=counter if decode_kernel == "torch" else "sdpa", attention_mode=mode,
                         decode_kernel=decode_kernel)
    rng = random.Random(seed)
    reqs = [_Req(i, [rng.randrange(cfg.vocab_size) for _ in range(n + 1)]) for i, n in enumerate(lengths)]
    mgr = runner.kv_manager
    order = list(range(len(reqs)))
    rng.shuffle(order)                                       # scattered block tables
    for i in order:
        assert mgr.allocate(i, reqs[i].all_token_ids[:-1]) == 0
    runner.execute([_Chunk(r, 0, n) for r, n in zip(reqs, lengths)], [])   # prefill every prompt
    for r, n in zip(reqs, lengths):
        mgr.commit_tokens(r.request_id, r.all_token_ids[:n])
        assert mgr.append_slots(r.request_id, 1)
    return model, runner, counter, reqs


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_a_decode_batch_is_one_backend_call_per_layer(batch):
    lengths = random.Random(batch).choices(range(1, 70), k=batch)          # ragged contexts
    model, runner, counter, reqs = _runner_with_contexts(lengths, "split")
    counter.calls.clear()
    logits = runner.execute([_Chunk(r, n, 1) for r, n in zip(reqs, lengths)], list(range(batch)))
    layers = model.cfg.num_hidden_layers
    assert counter.calls == [(batch, 1)] * layers, \
        f"{len(counter.calls)} backend calls for {layers} layers: {counter.calls}"
    for i, r in enumerate(reqs):                                            # the oracle: no cache at all
        ids = torch.tensor([r.all_token_ids])
        want = model(ids, torch.arange(ids.shape[1])[None], last_only=True)[0, 0]
        assert torch.allclose(logits[i], want, atol=1e-4), f"sequence {i}: " + describe_diff(logits[i], want)


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_a_decode_batch_is_one_kernel_call_per_layer(batch):
    """The same with the C++ decode kernel (minfer/kernels/cpu_paged_decode.py) reading the pool."""
    from minfer.kernels import cpu_paged_decode
    if not cpu_paged_decode.available():
        pytest.skip(f"the C++ kernel did not build: {cpu_paged_decode.why_unavailable()}")
    lengths = random.Random(batch).choices(range(1, 70), k=batch)
    model, runner, _, reqs = _runner_with_contexts(lengths, "split", decode_kernel="cpu")
    calls, kernel = [], runner.cache.attn.kernel
    runner.cache.attn.kernel = lambda q, *a, **kw: calls.append(q.shape[0]) or kernel(q, *a, **kw)
    logits = runner.execute([_Chunk(r, n, 1) for r, n in zip(reqs, lengths)], list(range(batch)))
    assert calls == [batch] * model.cfg.num_hidden_layers, calls
    for i, r in enumerate(reqs):
        ids = torch.tensor([r.all_token_ids])
        want = model(ids, torch.arange(ids.shape[1])[None], last_only=True)[0, 0]
        assert torch.allclose(logits[i], want, atol=1e-4), f"sequence {i}: " + describe_diff(logits[i], want)


def test_prefill_chunks_keep_their_own_calls_next_to_one_decode_call():
    lengths = [5, 9, 30, 12]
    model, runner, counter, reqs = _runner_with_contexts(lengths, "split", spare=8)
    mgr = runner.kv_manager
    new = [_Req(10, [1, 2, 3, 4, 5, 6]), _Req(11, list(range(20)))]
    for r in new:
        assert mgr.allocate(r.request_id, r.all_token_ids) == 0
    counter.calls.clear()
    chunks = [_Chunk(reqs[0], 5, 1), _Chunk(new[0], 0, 6), _Chunk(reqs[1], 9, 1), _Chunk(new[1], 0, 7),
              _Chunk(reqs[2], 30, 1), _Chunk(reqs[3], 12, 1)]
    runner.execute(chunks, list(range(6)))
    per_layer = sorted(counter.calls[:3])
    assert per_layer == [(1, 6), (1, 7), (4, 1)], per_layer
    assert len(counter.calls) == 3 * model.cfg.num_hidden_layers


# ---------------------------------------------------------------- the vectorized flattening


@settings(max_examples=40, deadline=None)
@given(bs=st.sampled_from([1, 2, 4, 16]), seed=st.integers(0, 2**16),
       ops=st.lists(st.sampled_from(["alloc", "append", "fork", "free"]), min_size=1, max_size=30))
def test_vectorized_batch_equals_the_per_sequence_formulas(bs, seed, ops):
    rng = random.Random(seed)
    mgr = KVCacheManager(BlockPool(64, bs, enable_prefix_caching=rng.random() < 0.5))
    tokens: dict[int, list[int]] = {}
    next_id = 0
    for op in ops:
        live = list(tokens)
        if op == "alloc" or not live:
            prompt = [rng.randrange(3) for _ in range(rng.randint(1, 12))]
            cached = mgr.allocate(next_id, prompt)
            if cached is not None:
                mgr.commit_tokens(next_id, prompt[cached:])
                tokens[next_id] = prompt
            next_id += 1
        elif op == "append":
            s = rng.choice(live)
            n = rng.randint(1, 5)
            if mgr.append_slots(s, n):
                new = [rng.randrange(3) for _ in range(n)]
                mgr.commit_tokens(s, new)
                tokens[s] += new
        elif op == "fork":
            s = rng.choice(live)
            mgr.fork(s, next_id)
            tokens[next_id] = list(tokens[s])
            next_id += 1
        else:
            s = rng.choice(live)
            mgr.free(s)
            del tokens[s]
        mgr.take_pending_copies()
        for s, seq in mgr.seqs.items():                    # the persistent tensor mirrors the lists
            assert mgr.tables.cpu[seq.row, :len(seq.block_table)].tolist() == seq.block_table
        assert len({seq.row for seq in mgr.seqs.values()}) == len(mgr.seqs)
    if not tokens:
        return
    picked = rng.sample(list(tokens), rng.randint(1, len(tokens)))
    chunks = []
    for s in picked:
        start = rng.randrange(len(tokens[s]))
        chunks.append(_Chunk(_Req(s, tokens[s]), start, rng.randint(1, len(tokens[s]) - start)))
    ids, meta = prepare_batch(mgr, chunks)
    assert ids[0].tolist() == [t for c in chunks for t in c.request.all_token_ids[c.start:c.start + c.num_tokens]]
    assert meta.positions[0].tolist() == [p for c in chunks for p in range(c.start, c.start + c.num_tokens)]
    assert meta.slot_mapping.tolist() == [x for c in chunks for x in compute_slot_mapping(
        mgr.block_table(c.request.request_id), bs, c.start, c.num_tokens)]
    assert meta.query_lens.tolist() == [c.num_tokens for c in chunks]
    assert meta.seq_lens.tolist() == [c.start + c.num_tokens for c in chunks]
    for c, row in zip(chunks, meta.block_tables.tolist()):
        need = -(-(c.start + c.num_tokens) // bs)
        assert row[:need] == mgr.block_table(c.request.request_id)[:need]
    ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
    assert meta.logits_indices.tolist() == ends.tolist()


def test_a_chunk_outside_its_reserved_slots_is_named():
    mgr = KVCacheManager(BlockPool(4, 4))
    mgr.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="chunk 0: positions \\[2, 5\\) of request 'a' are not reserved"):
        prepare_batch(mgr, [_Chunk(_Req("a", [1, 2, 3, 4, 5]), 2, 3)])
