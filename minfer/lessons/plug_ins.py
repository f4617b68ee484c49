"""A learner's scheduler step and slot mapping, built into an engine through its constructor.

``StepScheduler`` (a ``scheduler_cls``) and ``FunctionSlots`` (a ``kv_manager_cls``) call the
learner's functions, as vLLM takes ``SchedulerConfig.scheduler_cls``; ``rebuild(llm, ...)`` makes a
second ``LLM`` with them (docs/teaching.md).
"""
from functools import partial
from typing import Callable, Optional

import torch

from minfer.engine.request import Request, RequestStatus
from minfer.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from minfer.kv.block_pool import KVCacheManager


class StepScheduler(Scheduler):
    """A ``Scheduler`` whose every step is decided by ``step`` (lesson 05's ``schedule_step``): a decision
    the pool cannot honour raises ValueError, a step that does nothing RuntimeError (docs/teaching.md)."""

    def __init__(self, config, kv_manager, *, step: Callable, **kwargs):
        super().__init__(config, kv_manager, **kwargs)
        self.step = step

    def schedule(self) -> SchedulerOutput:
        scheduled, preempted = self._ask()
        by_id = {r.request_id: r for r in [*self.running, *self.waiting]}
        out = SchedulerOutput()
        for rid in preempted:
            req = by_id.get(rid)
            if req not in self.running:
                raise ValueError(f"schedule_step preempted {rid!r}, which is not running")
            self.preempt(req)
            out.preempted.append(req)
        for rid, n in scheduled:
            req = by_id.get(rid)
            if req is None or req in out.preempted or any(c.request is req for c in out.chunks):
                raise ValueError(f"schedule_step scheduled {rid!r}: not a running or waiting request, "
                                 f"preempted in this step, or scheduled twice")
            out.chunks.append(self._run(req, n))
        if not out.chunks and not out.preempted and self.has_unfinished():
            raise RuntimeError(f"schedule_step scheduled nothing while {len(self.waiting)} requests wait "
                               f"and {len(self.running)} run: the engine would wait forever")
        for c in out.chunks:
            c.request.num_computed_tokens += c.num_tokens
        return out

    def _ask(self) -> tuple[list, list]:
        """The step function's decisions on the requests as plain tuples."""
        cfg, kv, bs = self.config, self.kv, self.kv.block_size
        held = {r.request_id: -(-kv.num_tokens(r.request_id) // bs) for r in self.running}
        if sum(held.values()) != kv.pool.num_blocks - kv.pool.num_free_blocks:
            raise ValueError("schedule_step: running requests share KV blocks (prefix caching, n > 1 or a "
                             "sliding window); the exercise counts every request's blocks as its own: run "
                             "with enable_prefix_caching=False, n=1 and prompts of distinct first blocks")
        scheduled, preempted = self.step(
            [(r.request_id, r.num_tokens, r.num_computed_tokens, held[r.request_id]) for r in self.running],
            [(r.request_id, r.num_tokens) for r in self.waiting],
            cfg.max_num_batched_tokens, cfg.max_num_seqs, kv.pool.num_free_blocks, bs)
        if sum(n for _, n in scheduled) > cfg.max_num_batched_tokens:
            raise ValueError(f"schedule_step scheduled {scheduled}: more than the token budget "
                             f"{cfg.max_num_batched_tokens}")
        return scheduled, preempted

    def _run(self, req: Request, n: int) -> ScheduledChunk:
        """Admit ``req`` or reserve its next ``n`` slots, as the step decided; ValueError if impossible."""
        rid = req.request_id
        if not 1 <= n <= req.num_uncomputed_tokens:
            raise ValueError(f"schedule_step scheduled {n} tokens of {rid!r}, which has "
                             f"{req.num_uncomputed_tokens} to compute")
        if req.status is RequestStatus.WAITING:
            if len(self.running) >= self.config.max_num_seqs:
                raise ValueError(f"schedule_step admitted {rid!r} with max_num_seqs="
                                 f"{self.config.max_num_seqs} requests running already")
            free = self.kv.pool.num_free_blocks
            if not self._try_admit(req):
                raise ValueError(f"schedule_step admitted {rid!r} ({req.num_tokens} tokens) but only "
                                 f"{free} blocks of {self.kv.block_size} slots are free")
            n = min(n, req.num_uncomputed_tokens)     # prefix-cache hits are computed already
        elif not self._reserve(req, req.num_computed_tokens + n):
            raise ValueError(f"schedule_step ran {rid!r} for {n} tokens but the pool has no free block "
                             f"for them: preempt the newest running request first")
        return ScheduledChunk(req, req.num_computed_tokens, n)


class FunctionSlots(KVCacheManager):
    """A ``KVCacheManager`` whose slots come from ``slot_mapping(block_table, block_size,
    start_pos, num_tokens) -> [slot, ...]`` (lesson 04's exercise), one chunk at a time."""

    def __init__(self, pool, device="cpu", *, slot_mapping: Callable):
        super().__init__(pool, device=device)
        self.slot_fn = slot_mapping

    def slot_mapping(self, seq_id, start_pos: int, num_tokens: int) -> list[int]:
        super().slot_mapping(seq_id, start_pos, num_tokens)          # the range check
        return list(self.slot_fn(self.block_table(seq_id), self.block_size, start_pos, num_tokens))

    def batch_slot_mapping(self, chunks, tables, seq_of, positions) -> torch.Tensor:
        return torch.tensor([s for c in chunks for s in self.slot_mapping(c.request.request_id, c.start,
                                                                          c.num_tokens)], dtype=torch.long)


def engine_args(schedule_step: Optional[Callable] = None, slot_mapping: Optional[Callable] = None,
                attention: Optional[Callable] = None) -> dict:
    """The constructor arguments that build an engine on the learner's functions (None: the engine's)."""
    args = {} if attention is None else {"attention": attention}     # the paged cache's dense backend
    if schedule_step is not None:
        args["scheduler_cls"] = partial(StepScheduler, step=schedule_step)
    if slot_mapping is not None:
        args["kv_manager_cls"] = partial(FunctionSlots, slot_mapping=slot_mapping)
    return args


def rebuild(llm, **functions: Callable):
    """A second ``LLM`` on ``llm``'s model, tokenizer and engine settings, built with ``engine_args``."""
    from minfer.llm import LLM

    if llm.speculative is not None or llm.driver is not None:
        raise ValueError("the learner's attention, scheduler step and slot mapping run in the engine: build the LLM "
                         "without speculative decoding and tensor/pipeline parallelism")
    kv, cfg = llm.engine.runner.kv_manager, llm.engine.config
    scratch = 0 if llm.enforce_eager else 1                # the static path's block (ModelRunner)
    settings = dict(attention=llm.attention, block_size=kv.block_size, num_blocks=kv.pool.num_blocks - scratch,
                    enable_prefix_caching=kv.pool.enable_prefix_caching, max_num_seqs=cfg.max_num_seqs,
                    max_num_batched_tokens=cfg.max_num_batched_tokens, max_prefill_chunk=cfg.max_prefill_chunk,
                    kv_cache_dtype=llm.kv_cache_dtype, enforce_eager=llm.enforce_eager)
    return LLM.from_model(llm.model, llm.tokenizer, **(settings | engine_args(**functions)))


def pad_static_rows(llm, pad_to_bucket: Callable, pad_batch: Callable) -> None:
    """Make ``llm``'s static decode step (``enforce_eager=False``) take its bucket from
    ``pad_to_bucket(n, sizes) -> (bucket, padded)`` and its rows from ``pad_batch`` (lesson 08)."""
    static = llm.engine.runner.static
    if static is None:
        raise ValueError("the static decode step runs only in an LLM built with enforce_eager=False")

    def load(input_ids, meta) -> int:
        S, cols = len(meta.query_lens), meta.block_tables.shape[1]
        n = int(pad_to_bucket(S, static.sizes)[0])
        rows = pad_batch(input_ids[0].tolist(), meta.positions[0].tolist(), meta.slot_mapping.tolist(),
                         meta.seq_lens.tolist(), n, static.scratch_slot)
        for buffer, values in zip((static.input_ids[0], static.positions[0], static.slot_mapping,
                                   static.context_lens), rows):
            buffer[:n] = torch.tensor(values, dtype=torch.long)
        static.block_tables[:S, :cols] = meta.block_tables
        static.block_tables[S:n, 0] = static.scratch_block           # the block a padded row's one key lies in
        return n
    static.load = load
