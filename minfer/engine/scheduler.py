"""The scheduler: which requests run in the next forward pass, and how many tokens each.

Each step fills a token budget with decodes and prefill chunks (vLLM V1,
``vllm/v1/core/sched/scheduler.py``); policies ``static``, ``dynamic``, ``continuous`` (Orca, OSDI
2022); out of blocks, the newest running request is preempted by recompute. Details: docs/architecture.md.
"""
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from minfer.engine.request import Request, RequestStatus
from minfer.validation import check_int

POLICIES = ("static", "dynamic", "continuous")


@dataclass
class SchedulerConfig:
    policy: str = "continuous"            # static | dynamic | continuous
    max_num_seqs: int = 32                # running requests at most (the batch size of static/dynamic)
    max_num_batched_tokens: int = 512     # token budget of one step (vLLM's name)
    max_prefill_chunk: int | None = None  # at most this many prompt tokens per request per step
    max_wait_ms: float = 50.0             # dynamic: start a partial batch after this wait
    batch_invariant: bool = False         # prompt chunks end at fixed positions, whatever the batch

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        check_int(self.max_num_seqs, "max_num_seqs", lo=1)
        check_int(self.max_num_batched_tokens, "max_num_batched_tokens", lo=1)
        if self.max_prefill_chunk is not None:
            check_int(self.max_prefill_chunk, "max_prefill_chunk (or None)", lo=1)
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")


@dataclass
class ScheduledChunk:
    request: Request
    start: int          # position of the first token computed (= num_computed_tokens before the step)
    num_tokens: int     # tokens computed this step: a prompt chunk, or 1 for a decode


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Waiting queue + running list + block manager (a ``KVCacheManager``), stepped by ``schedule()``."""

    def __init__(self, config: SchedulerConfig, kv_manager, clock: Callable[[], float] = time.perf_counter,
                 sliding_window: int | None = None):
        self.config = config
        self.sliding_window = sliding_window      # blocks wholly outside the window go back to the pool
        self.kv = kv_manager
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # in admission order: the last one is the newest
        self.no_more_requests = False             # set by the client: static/dynamic may start a short batch
        self.prefix_cache_queries = 0             # prompt tokens looked up at admission (vLLM's counter names)
        self.prefix_cache_hits = 0                # ... of which found in the prefix cache

    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        self.finish(req, RequestStatus.FINISHED_ABORTED)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Leave the running list, give the blocks back, take ``status`` (a finished one, or WAITING)."""
        if req in self.running:
            self.running.remove(req)
        self._release(req)
        req.status = status

    def fork(self, parent: Request, child: Request) -> None:
        """``child`` starts where ``parent`` is, sharing its KV blocks (parallel sampling, n > 1)."""
        self.kv.fork(parent.request_id, child.request_id)
        child.num_computed_tokens = parent.num_computed_tokens
        self._start_running(child)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, req: Request) -> None:
        if req.request_id in self.kv.seqs:        # the KV manager owns its reserved slots
            self.kv.free(req.request_id)

    def preempt(self, req: Request) -> None:
        """Preemption by recompute: drop its K/V; it will prefill prompt + outputs again."""
        self.finish(req, RequestStatus.WAITING)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.stats.num_preemptions += 1
        self.waiting.appendleft(req)          # first in line when memory frees up

    def _chunk_len(self, req: Request, budget: int) -> int:
        """Tokens of ``req`` to compute this step: all it has, within the budget and the prefill chunk cap.
        Batch-invariant: up to the next multiple of the cap, or 0 (wait) if that piece does not fit now."""
        cfg, left = self.config, req.num_uncomputed_tokens
        cap = min(cfg.max_prefill_chunk or math.inf, cfg.max_num_batched_tokens)
        if cfg.batch_invariant and left > 1:
            n = min(left, cap - req.num_computed_tokens % cap)
            return n if n <= budget else 0
        return min(left, budget, cap) if left > 1 else min(left, budget)

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        if req.stats.first_scheduled_time is None:
            req.stats.first_scheduled_time = self.clock()
        self.running.append(req)

    def _try_admit(self, req: Request) -> bool:
        """Reserve KV blocks for all its tokens; False (nothing changed) if the pool is full."""
        # Prompt logprobs need every prompt row's logits, which a prefix-cache hit skips: such a
        # request does not read the cache (vLLM: ``skip_reading_prefix_cache``, kv_cache_manager.py).
        skip = {"read_cache": False} if req.params.prompt_logprobs is not None else {}
        computed = self.kv.allocate(req.request_id, req.all_token_ids, **skip)
        if computed is None:
            return False
        if not skip:                                      # a preempted request counts again when re-admitted
            self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += computed
        self.waiting.remove(req)
        # Prefix-cache hit: those tokens' K/V are already there. At least the last
        # token is computed again, because its logits give the next token.
        req.num_computed_tokens = min(computed, req.num_tokens - 1)
        self._start_running(req)
        return True

    def add_computed(self, req: Request) -> int | None:
        """Admit ``req`` whose tokens were all computed elsewhere (a disaggregated prefill worker) -> the
        tokens the prefix cache held (the caller writes the K/V after them), or None (nothing changed)."""
        if len(self.running) >= self.config.max_num_seqs:
            return None
        hit = self.kv.allocate(req.request_id, req.all_token_ids)
        if hit is None:
            return None
        self.kv.commit_tokens(req.request_id, req.all_token_ids[hit:])
        req.num_computed_tokens = req.num_tokens
        self._start_running(req)
        return hit

    def _batch_ready(self, now: float) -> bool:
        """static/dynamic: may a new fixed batch start now? (Only when the previous one is done.)"""
        if self.running or not self.waiting:
            return False
        if len(self.waiting) >= self.config.max_num_seqs or self.no_more_requests:
            return True
        oldest_wait = now - min(r.arrival_time for r in self.waiting)
        return self.config.policy == "dynamic" and oldest_wait * 1000.0 >= self.config.max_wait_ms

    def _reserve(self, req: Request, upto: int) -> bool:
        """Make sure slots exist for positions [0, upto); False if the pool is out of blocks."""
        need = upto - self.kv.num_tokens(req.request_id)
        return need <= 0 or self.kv.append_slots(req.request_id, need)

    def schedule(self) -> SchedulerOutput:
        """Decide the next forward pass. Advances ``num_computed_tokens`` of each scheduled request."""
        cfg = self.config
        now = self.clock()
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens

        # static / dynamic: a new fixed batch, admitted all at once.
        if cfg.policy != "continuous" and self._batch_ready(now):
            for req in list(self.waiting)[:cfg.max_num_seqs]:
                if not self._try_admit(req):
                    break

        # 1) running requests, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk_len(req, budget)
            if n == 0:                                    # batch-invariant: its next chunk waits
                i += 1
                continue
            while not self._reserve(req, req.num_computed_tokens + n):
                victim = self.running[-1]                 # the newest running request
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:   # it preempted itself: nothing left to run
                break
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            i += 1

        # 2) continuous: waiting requests join in the leftover budget (not in a step that
        #    had to preempt: memory is short, as in vLLM).
        if cfg.policy == "continuous" and not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                req = self.waiting[0]
                if not self._chunk_len(req, budget) or not self._try_admit(req):
                    break
                n = self._chunk_len(req, budget)
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n

        for c in out.chunks:
            c.request.num_computed_tokens += c.num_tokens
        return out

    def commit(self, out: SchedulerOutput) -> None:
        """After the forward: tell the block manager which token ids are now stored (prefix caching)."""
        for c in out.chunks:
            req = c.request
            if req.status is RequestStatus.RUNNING:
                stored = self.kv.num_computed_tokens(req.request_id)
                self.kv.commit_tokens(req.request_id, req.all_token_ids[stored:req.num_computed_tokens])
                if self.sliding_window is not None:   # the next query sits at num_computed_tokens
                    self.kv.drop_blocks_before(req.request_id, req.num_computed_tokens - self.sliding_window + 1)
