"""The serving engine: many requests, one model, one forward pass per step.

    add_request ──> Scheduler ──(chunks: request, start, n)──> ModelRunner ──> logits
         ^           (policy, token budget,                  (flattened batch,   │
         │            block pool, preemption)                 paged KV cache)     v
    StepOutput <── detokenize <── stop checks <── sample (each request's own generator)

``LLMEngine.step()`` is one iteration: schedule, run the model on the
flattened batch, sample a token for every request whose uncomputed tokens are
now all computed, check the stop conditions, free finished requests, and
return what each request gained (for streaming). vLLM's equivalent is the
``EngineCore.step`` loop (``vllm/v1/engine/core.py``) with the model runner of
``vllm/v1/worker/gpu_model_runner.py``.

Sampling stays per request: each request owns a ``torch.Generator`` seeded
from its ``SamplingParams.seed``, and draws from it only when it produces a
token. Its outputs therefore depend on its seed and its own logits, never on
the rest of the batch, on chunk sizes, or on preemptions.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from minfer.sampling import SamplingParams, pair_prompts, sample_rows
from minfer.serving.request import Request, RequestStatus
from minfer.serving.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from minfer.validation import check_prompt


@dataclass
class StepOutput:
    """What one request gained in one step (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None


# ---------------------------------------------------------------------------
# The model runner: a scheduled step -> one forward over the flattened batch
# ---------------------------------------------------------------------------


class ModelRunner:
    """Runs the model on the paged KV cache (vLLM: ``GPUModelRunner.execute_model``).

    ``execute(chunks, sample_rows)`` builds ``input_ids (1, N)`` and
    ``positions (1, N)`` from the chunks, installs the ``PagedBatch``
    (slot mapping, block tables), runs the model and returns the logits of the
    last token of each chunk in ``sample_rows``: (len(sample_rows), vocab).
    Chunks in the middle of a prompt produce no logits: the LM head is skipped.
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = True,
                 attention: str = "sdpa", attention_mode: str = "split"):
        from minfer.kv.block_pool import BlockPool, KVCacheManager
        from minfer.kv.paged import ATTENTION_MODES, PagedKVCache
        from minfer.serving.split_attention import SplitPagedKVCache
        if attention_mode not in ("split", *ATTENTION_MODES):
            raise ValueError(f"attention_mode must be 'split' or one of {ATTENTION_MODES}, got {attention_mode!r}")
        self.model, self.attention = model, attention
        w = model.model.embed_tokens.weight
        if attention_mode == "split":     # decodes batched, prefill chunks one by one (split_attention.py)
            self.cache = SplitPagedKVCache(model.cfg, num_blocks, block_size, dtype=w.dtype, device=w.device)
        else:                             # PagedKVCache's own: everything padded to one batch
            self.cache = PagedKVCache(model.cfg, num_blocks, block_size, dtype=w.dtype, device=w.device,
                                      attention_mode=attention_mode)
        self.kv_manager = KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching))
        self.device = model.inv_freq.device
        self.vocab_size = model.cfg.vocab_size

    @torch.no_grad()
    def execute(self, chunks: Sequence[ScheduledChunk], sample_rows: Sequence[int]) -> torch.Tensor:
        from minfer.kv.paged import PagedBatch
        meta = PagedBatch.build(self.kv_manager, [(c.request.request_id, c.start, c.num_tokens) for c in chunks],
                                device=self.device)
        ids = [t for c in chunks for t in c.request.all_token_ids[c.start:c.start + c.num_tokens]]
        self.cache.copy_blocks(self.kv_manager.take_pending_copies())
        self.cache.set_batch(meta)
        input_ids = torch.tensor([ids], device=self.device)                          # (1, N)
        rows = meta.logits_indices[list(sample_rows)] if sample_rows else meta.logits_indices[:0]
        logits = self.model(input_ids, meta.positions, kv_cache=self.cache, attention=self.attention,
                            logits_indices=rows)                                      # (1, K, V)
        return logits[0]


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


class LLMEngine:
    """``add_request`` / ``step`` / ``abort``; ``generate`` for a whole list at once.

    Build it with ``LLMEngine.from_model(model, tokenizer, policy=...)``; the
    constructor takes any runner with ``execute``, ``kv_manager`` and
    ``vocab_size`` (the tests use a fake model).
    """

    def __init__(self, runner, scheduler_config: SchedulerConfig | None = None, *, tokenizer=None,
                 eos_token_ids: Iterable[int] | None = None, max_model_len: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.runner = runner
        self.config = scheduler_config or SchedulerConfig()
        self.scheduler = Scheduler(self.config, runner.kv_manager, clock=clock)
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len or math.inf
        self.clock = clock
        self.requests: dict[str, Request] = {}     # every request ever added (finished ones too)
        self._detok: dict[str, object] = {}
        self._emitted: dict[str, int] = {}         # characters of text already streamed
        self._ids = itertools.count()
        self.num_steps = 0

    @classmethod
    def from_model(cls, model, tokenizer=None, *, policy: str = "continuous", max_num_seqs: int = 32,
                   max_num_batched_tokens: int = 512, max_prefill_chunk: int | None = None,
                   max_wait_ms: float = 50.0, block_size: int = 16, num_blocks: int | None = None,
                   kv_cache_memory: float = 2 * 2**30, enable_prefix_caching: bool = True,
                   attention: str = "sdpa", attention_mode: str = "split",
                   eos_token_ids: Iterable[int] | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> "LLMEngine":
        """An engine over a minfer ``Transformer``.

        num_blocks: KV blocks in the pool. Default: enough for ``max_num_seqs`` requests of
        the model's full context, but at most ``kv_cache_memory`` bytes.
        """
        from minfer.kv.paged import PagedKVCache
        cfg = model.cfg
        if num_blocks is None:
            dtype = model.model.embed_tokens.weight.dtype
            want = max_num_seqs * -(-cfg.max_position_embeddings // block_size)
            fit = PagedKVCache.num_blocks_for_memory(cfg, kv_cache_memory, block_size, dtype)
            num_blocks = max(1, min(want, fit))
        runner = ModelRunner(model, num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                             attention=attention, attention_mode=attention_mode)
        sc = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             max_prefill_chunk=max_prefill_chunk, max_wait_ms=max_wait_ms)
        return cls(runner, sc, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                   max_model_len=cfg.max_position_embeddings, clock=clock)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request (text or token ids); returns its id. ``arrival_time`` defaults to now."""
        params = params or SamplingParams()
        check_prompt(prompt)                    # str or token ids: no bytes, floats or bools
        if params.n != 1:
            raise ValueError(f"SamplingParams.n must be 1 in the serving engine (add {params.n} requests "
                             f"with different seeds instead), got {params.n}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs an engine with a tokenizer")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer; pass token ids instead")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        vocab = self.runner.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the model's context is "
                             f"{self.max_model_len} tokens (prompt + new tokens must fit)")
        pool = self.runner.kv_manager.pool
        need = -(-(len(ids) + min(params.max_tokens, self.max_model_len - len(ids))) // pool.block_size)
        if need > pool.num_blocks:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV "
                             f"blocks, but the pool has only num_blocks={pool.num_blocks}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self.requests:
                request_id = f"req-{next(self._ids)}"
        elif request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} was already added")
        req = Request(request_id, ids, params, self.clock() if arrival_time is None else arrival_time,
                      eos_token_ids=self.eos_token_ids, prompt=text)
        self.requests[request_id] = req
        if self.tokenizer is not None:
            from minfer.tokenizer import IncrementalDetokenizer
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer)
            self._emitted[request_id] = 0
        self.scheduler.add_request(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now (waiting or running); its blocks are freed. Unknown or finished: no-op."""
        req = self.requests.get(request_id)
        if req is not None and not req.is_finished:
            self.scheduler.abort(req)
            req.stats.finish_time = self.clock()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def no_more_requests(self, value: bool = True) -> None:
        """Tell static/dynamic batching that nothing else is coming: a short last batch may start."""
        self.scheduler.no_more_requests = value

    # ------------------------------------------------------------------ one iteration
    def step(self) -> list[StepOutput]:
        """Schedule, run one forward, sample, check stops. Returns the streaming deltas."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self.num_steps += 1
        # Requests whose every token is now computed produce a token this step.
        rows = [i for i, c in enumerate(out.chunks) if c.request.num_computed_tokens == c.request.num_tokens]
        logits = self.runner.execute(out.chunks, rows)                         # (len(rows), V)
        self.scheduler.commit(out)
        now = self.clock()
        reqs = [out.chunks[i].request for i in rows]
        toks = sample_rows(logits, [r.params for r in reqs], [r.generator for r in reqs])
        return [self._append_token(req, tok, now) for req, tok in zip(reqs, toks)]

    def _append_token(self, req: Request, tok: int, now: float) -> StepOutput:
        req.output_token_ids.append(tok)
        req.stats.token_times.append(now)
        params = req.params
        status = None
        if tok in req.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        new_text = ""
        detok = self._detok.get(req.request_id)
        if detok is not None:
            if not (status is RequestStatus.FINISHED_STOPPED and tok in req.stop_token_ids):
                req.text += detok.add(tok)
            if status is not None:
                req.text += detok.flush()
            hits = [req.text.find(s) for s in params.stop if s in req.text]
            if hits:
                req.text, status = req.text[:min(hits)], RequestStatus.FINISHED_STOPPED
            # Stream only text that cannot be the start of a stop string.
            hold = 0 if status is not None else max((len(s) for s in params.stop), default=1) - 1
            safe = max(self._emitted[req.request_id], len(req.text) - hold)
            new_text = req.text[self._emitted[req.request_id]:safe]
            self._emitted[req.request_id] = safe
        if status is not None:
            self.scheduler.finish(req, status)
            req.stats.finish_time = now
        return StepOutput(req.request_id, [tok], new_text, status is not None,
                          status.value if status is not None else None)

    # ------------------------------------------------------------------ conveniences
    def stream(self) -> Iterator[StepOutput]:
        """Step until every request has finished, yielding each delta as it comes."""
        while self.has_unfinished_requests():
            yield from self.step()

    def run(self) -> None:
        """Step until every request has finished."""
        for _ in self.stream():
            pass

    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[Request]:
        """Offline use: add every prompt now, run to completion, return the requests in order."""
        prompts, params = pair_prompts(prompts, params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        before = self.scheduler.no_more_requests
        self.no_more_requests(True)
        try:
            self.run()
        finally:
            self.no_more_requests(before)
        return [self.requests[i] for i in ids]


# ---------------------------------------------------------------------------
# Online serving of a trace: requests arrive at their times while the engine steps
# ---------------------------------------------------------------------------


def run_trace(engine: LLMEngine, trace, make_params: Callable[[object], SamplingParams],
              sleep: Callable[[float], None] = time.sleep, on_output: Callable[[StepOutput], None] | None = None,
              ) -> tuple[list[Request], float]:
    """Replay ``trace`` (``workload.TraceRequest``s) against ``engine`` in real time.

    Request i arrives at ``t0 + trace[i].arrival_time`` on the engine's clock and is
    stamped with that arrival time even if the engine was busy with a step then:
    the wait counts in its TTFT, as it would in a real server. When nothing can run,
    the loop sleeps until the next arrival (``sleep`` may advance a fake clock).
    Returns the requests (trace order) and the duration (first arrival -> last finish).
    """
    clock = engine.clock
    pending = sorted(trace, key=lambda r: r.arrival_time)
    t0 = clock()
    ids, k = [], 0
    while k < len(pending) or engine.has_unfinished_requests():
        now = clock()
        while k < len(pending) and t0 + pending[k].arrival_time <= now:
            r = pending[k]
            ids.append(engine.add_request(r.prompt_token_ids, make_params(r), request_id=r.request_id,
                                          arrival_time=t0 + r.arrival_time))
            k += 1
        if k == len(pending):
            engine.no_more_requests(True)
        before = engine.num_steps
        for d in engine.step():
            if on_output is not None:
                on_output(d)
        if engine.num_steps == before:
            # Idle, or a static/dynamic batch still forming: sleep until the next arrival
            # (or until the oldest waiting request reaches dynamic batching's max_wait_ms).
            if k == len(pending):
                raise RuntimeError("the engine has unfinished requests but schedules nothing")
            wake = t0 + pending[k].arrival_time
            if engine.config.policy == "dynamic" and engine.scheduler.waiting:
                oldest = min(r.arrival_time for r in engine.scheduler.waiting)
                wake = min(wake, oldest + engine.config.max_wait_ms / 1000.0)
            sleep(max(wake - clock(), 1e-6))
    reqs = [engine.requests[r.request_id] for r in trace]
    finish = max(r.stats.finish_time for r in reqs) if reqs else t0
    return reqs, finish - t0
