"""The simplest drivers of the paged cache: one request, or one prompt with n forked samples.

The serving engine (``minfer/serving``) is the real, batched driver: its
scheduler decides each step which sequences run. These two show the
protocol with no scheduler in the way::

    n0 = manager.allocate(seq, prompt)            # None: out of blocks
    paged_forward(model, cache, manager, [(seq, n0, prompt[n0:])])     # prefill what is not cached
    loop:   manager.append_slots(seq, 1)          # False: out of blocks
            paged_forward(model, cache, manager, [(seq, pos, [token])])  # decode
    manager.free(seq)

``paged_forward`` runs one forward over a flattened batch: it performs the
pending copy-on-write copies, installs the ``PagedBatch``, runs the model,
commits the tokens (so full blocks enter the prefix cache) and returns the
logits of each sequence's last token.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator, Sequence

import torch

from minfer.generate import RequestMetrics, check_context
from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.kv.paged import PagedBatch, PagedKVCache
from minfer.sampling import SamplingParams, make_generator, sample

_ids = itertools.count()


class OutOfBlocks(RuntimeError):
    """The block pool cannot hold this request (the drivers here have nobody to preempt)."""


def make_paged(model, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = True,
               attention_mode: str = "gather") -> tuple[PagedKVCache, KVCacheManager]:
    """A ``PagedKVCache`` with the model's dtype/device and a ``KVCacheManager`` over the same blocks."""
    w = model.model.embed_tokens.weight
    cache = PagedKVCache(model.cfg, num_blocks, block_size, dtype=w.dtype, device=w.device,
                         attention_mode=attention_mode)
    return cache, KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching))


@torch.no_grad()
def paged_forward(model, cache: PagedKVCache, manager: KVCacheManager,
                  chunks: Sequence[tuple[object, int, Sequence[int]]], attention="sdpa") -> torch.Tensor:
    """One forward of ``[(seq_id, start_pos, token_ids), ...]`` (slots reserved); logits (S, V)."""
    device = cache.k.device
    meta = PagedBatch.build(manager, [(s, p, len(t)) for s, p, t in chunks], device=device)
    cache.copy_blocks(manager.take_pending_copies())
    cache.set_batch(meta)
    ids = torch.tensor([[t for _, _, toks in chunks for t in toks]], device=device)    # (1, N)
    if len(chunks) == 1:         # the last token is the only one whose logits we need
        logits = model(ids, meta.positions, kv_cache=cache, attention=attention, last_only=True)[0]
    else:
        logits = model(ids, meta.positions, kv_cache=cache, attention=attention)[0, meta.logits_indices]
    for seq_id, _, toks in chunks:
        manager.commit_tokens(seq_id, list(toks))
    return logits                                                          # (S, V)


def _blocks_for(num_tokens: int, block_size: int, n: int = 1) -> int:
    return n * (-(-num_tokens // block_size) + 1)


@torch.no_grad()
def generate_paged(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_token_ids: Sequence[int] = (),
    cache: PagedKVCache | None = None,       # reuse across requests (prefix caching); None: a fresh one
    manager: KVCacheManager | None = None,
    block_size: int = 16,
    attention: str = "sdpa",
    attention_mode: str = "gather",
    prefill_chunk: int | None = None,
    metrics: RequestMetrics | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """``generate_tokens`` through the paged cache: yield new token ids of one request.

    Prompt tokens found in the prefix cache are not prefilled. The request's
    blocks are freed at the end (they stay in the prefix cache). Raises
    ``OutOfBlocks`` when the pool is too small for the request.
    """
    cfg = model.cfg
    check_context(len(prompt_ids), cfg.max_position_embeddings)
    max_new = min(params.max_tokens, cfg.max_position_embeddings - len(prompt_ids))
    if (cache is None) != (manager is None):
        raise ValueError("pass both cache and manager, or neither")
    if cache is None:
        cache, manager = make_paged(model, _blocks_for(len(prompt_ids) + max_new, block_size), block_size,
                                    attention_mode=attention_mode)
    gen = make_generator(params.seed)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    if metrics is not None:
        metrics.num_prompt_tokens = len(prompt_ids)
    seq = ("request", next(_ids))
    n_cached = manager.allocate(seq, prompt_ids)
    if n_cached is None:
        raise OutOfBlocks(f"the prompt needs {-(-len(prompt_ids) // manager.block_size)} blocks, "
                          f"{manager.pool.num_free_blocks} are free")
    try:
        chunk = prefill_chunk or len(prompt_ids)
        for s in range(n_cached, len(prompt_ids), chunk):                   # prefill what is not cached
            logits = paged_forward(model, cache, manager, [(seq, s, prompt_ids[s:s + chunk])], attention)[0]
        pos = len(prompt_ids)
        for step in range(max_new):
            tok = sample(logits, params, gen)
            if metrics is not None:
                metrics.record_token(clock())
            yield tok
            if tok in stop_ids or step == max_new - 1:
                break
            if not manager.append_slots(seq, 1):
                raise OutOfBlocks(f"no free block for position {pos}")
            logits = paged_forward(model, cache, manager, [(seq, pos, [tok])], attention)[0]
            pos += 1
    finally:
        manager.free(seq)


@torch.no_grad()
def generate_paged_n(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_token_ids: Sequence[int] = (),
    cache: PagedKVCache | None = None,
    manager: KVCacheManager | None = None,
    block_size: int = 16,
    attention: str = "sdpa",
    on_step: Callable[[KVCacheManager, list], None] | None = None,
) -> list[list[int]]:
    """Parallel sampling: prefill once, fork ``params.n`` children, decode them in one batch.

    The children share the prompt's blocks; the first append to the shared,
    partly filled last block copies it (copy-on-write). Child i samples with
    seed ``params.seed + i`` (or unseeded). ``on_step(manager, seq_ids)`` is
    called after each decode step (the lesson draws the block tables there).
    """
    cfg = model.cfg
    n = params.n
    check_context(len(prompt_ids), cfg.max_position_embeddings)
    max_new = min(params.max_tokens, cfg.max_position_embeddings - len(prompt_ids))
    if (cache is None) != (manager is None):
        raise ValueError("pass both cache and manager, or neither")
    if cache is None:
        cache, manager = make_paged(model, _blocks_for(len(prompt_ids) + max_new, block_size, n), block_size)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    tag = next(_ids)
    parent = ("prompt", tag)
    n_cached = manager.allocate(parent, prompt_ids)
    if n_cached is None:
        raise OutOfBlocks("no room for the prompt")
    children = [("sample", tag, i) for i in range(n)]
    try:
        logits = paged_forward(model, cache, manager, [(parent, n_cached, prompt_ids[n_cached:])], attention)[0]
        for c in children:
            manager.fork(parent, c)
        manager.free(parent)                     # the children hold the prompt's blocks now
        gens = [make_generator(None if params.seed is None else params.seed + i) for i in range(n)]
        outputs: list[list[int]] = [[] for _ in range(n)]
        live = list(range(n))
        pos = len(prompt_ids)
        for i in live:
            outputs[i].append(sample(logits, params, gens[i]))
        for step in range(1, max_new + 1):
            live = [i for i in live if outputs[i][-1] not in stop_ids and len(outputs[i]) < max_new]
            for i in range(n):
                if i not in live and children[i] in manager.seqs:
                    manager.free(children[i])
            if not live:
                break
            for i in live:
                if not manager.append_slots(children[i], 1):
                    raise OutOfBlocks(f"no free block for sample {i} at position {pos}")
            logits = paged_forward(model, cache, manager,
                                   [(children[i], pos, [outputs[i][-1]]) for i in live], attention)
            if on_step is not None:
                on_step(manager, [children[i] for i in live])
            for row, i in enumerate(live):
                outputs[i].append(sample(logits[row], params, gens[i]))
            pos += 1
        return outputs
    finally:
        for c in children:
            if c in manager.seqs:
                manager.free(c)
        if parent in manager.seqs:
            manager.free(parent)
