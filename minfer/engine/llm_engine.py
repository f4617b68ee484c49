"""The engine: many requests, one model, one forward pass per step.

``step()``: schedule, run the model on the flattened batch, sample a token for every request whose
tokens are all computed, check the stops, free finished requests, return each one's delta. Each request
samples from its own seeded generator; ``n > 1`` forks after the prompt (sample i: seed ``seed + i``).
vLLM: ``EngineCore.step`` (``vllm/v1/engine/core.py``), ``LLMEngine`` (``vllm/v1/engine/llm_engine.py``),
``ParentRequest`` (``parallel_sampling.py``). The diagram: docs/architecture.md.
"""
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from minfer.devices import to_device
from minfer.engine.output import TextOutput
from minfer.engine.request import Request, RequestStatus
from minfer.engine.runner import ModelRunner
from minfer.guided import advance, mask_logits, new_matcher
from minfer.engine.scheduler import Scheduler, SchedulerConfig
from minfer.kv.block_pool import KVCacheManager
from minfer.kv.coordinator import KVCacheCoordinator, kv_cache_groups
from minfer.logprobs import LOGPROBS_MODES, prompt_rows, record_prompt, record_sampled
from minfer.sampling import SamplingParams, finish_reason, pair_prompts, sample_rows
from minfer.validation import check_context, check_prompt


@dataclass
class StepOutput:
    """What one sequence gained in one step (a streaming delta)."""

    request_id: str                 # the client's id (shared by the n samples of a request)
    new_token_ids: list[int]
    new_text: str
    finished: bool                  # this sample is done
    finish_reason: str | None       # "stop" | "length" | "abort" once finished
    index: int = 0                  # which parallel sample (0 .. n - 1)
    logprobs: list | None = None    # the new tokens' logprob dicts (SamplingParams.logprobs), else None


class LLMEngine:
    """``add_request`` / ``step`` / ``abort``; ``generate`` for a whole list at once. Build it with
    ``from_model``; the constructor takes any runner with ``execute``, ``kv_manager``, ``vocab_size``."""

    def __init__(self, runner, scheduler_config: SchedulerConfig | None = None, *, tokenizer=None,
                 eos_token_ids: Iterable[int] | None = None, max_model_len: int | None = None,
                 sliding_window: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 scheduler_cls: Callable[..., Scheduler] = Scheduler, logprobs_mode: str = "raw_logprobs"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.runner, self.logprobs_mode = runner, logprobs_mode
        self.config = scheduler_config or SchedulerConfig()
        self.scheduler = scheduler_cls(self.config, runner.kv_manager, clock=clock, sliding_window=sliding_window)
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.eos_token_ids = tuple(eos_token_ids)
        self._decode = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else None
        self.max_model_len = max_model_len or math.inf
        self.clock = clock
        self.requests: dict[str, Request] = {}     # every sequence ever added (finished ones too)
        self.samples: dict[str, list[Request]] = {}   # client id -> its n samples, by index
        self._text: dict[str, TextOutput] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    @classmethod
    def from_model(cls, model, tokenizer=None, *, policy: str = "continuous", max_num_seqs: int = 32,
                   max_num_batched_tokens: int = 512, max_prefill_chunk: int | None = None,
                   max_wait_ms: float = 50.0, block_size: int = 16, num_blocks: int | None = None,
                   kv_cache_memory: float = 2 * 2**30, enable_prefix_caching: bool = True,
                   kv_cache_dtype: str = "auto", attention: str = "sdpa", attention_mode: str = "split",
                   eos_token_ids: Iterable[int] | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   wrap_runner: Callable[[ModelRunner], object] | None = None, enforce_eager: bool = True,
                   compile: bool = False, max_seq_len_to_capture: int | None = None,
                   decode_kernel: str = "auto", scheduler_cls: Callable[..., Scheduler] = Scheduler,
                   kv_manager_cls: Callable[..., KVCacheManager] = KVCacheManager,
                   logprobs_mode: str = "raw_logprobs", batch_invariant: bool = False) -> "LLMEngine":
        """An engine over a minfer ``Transformer`` (the arguments: ``LLM``'s, docs/architecture.md).
        num_blocks: default enough for ``max_num_seqs`` full contexts, at most ``kv_cache_memory`` bytes.
        wrap_runner: ``ModelRunner -> runner`` (parallelism broadcasts steps: ``minfer.distributed.engine``).
        scheduler_cls, kv_manager_cls: another policy or slot layout (as lessons 04 and 05 plug in)."""
        from minfer.kv.paged import PagedKVCache
        cfg = model.cfg
        sc = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             max_prefill_chunk=max_prefill_chunk, max_wait_ms=max_wait_ms,
                             batch_invariant=batch_invariant)
        if num_blocks is None:
            dtype = model.model.embed_tokens.weight.dtype
            want = max_num_seqs * -(-cfg.max_position_embeddings // block_size) * len(kv_cache_groups(cfg))
            fit = PagedKVCache.num_blocks_for_memory(cfg, kv_cache_memory, block_size, dtype, kv_cache_dtype)
            num_blocks = max(1, min(want, fit))
        runner = ModelRunner(model, num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                             attention=attention, attention_mode=attention_mode, kv_cache_dtype=kv_cache_dtype,
                             enforce_eager=enforce_eager, max_num_seqs=max_num_seqs, compile=compile,
                             max_seq_len_to_capture=max_seq_len_to_capture, decode_kernel=decode_kernel,
                             kv_manager_cls=kv_manager_cls, max_num_batched_tokens=max_num_batched_tokens)
        _batch_invariant(model, runner, batch_invariant, enable_prefix_caching)
        if wrap_runner is not None:
            runner = wrap_runner(runner)
        return cls(runner, sc, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                   max_model_len=cfg.max_position_embeddings, clock=clock, scheduler_cls=scheduler_cls,
                   logprobs_mode=logprobs_mode,
                   sliding_window=None if cfg.is_hybrid else cfg.window_of(0))   # global layers keep every block

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request (text or token ids); returns its id. ``arrival_time`` defaults to now."""
        req = self._new_request(prompt, params, request_id, arrival_time)
        self._track(req)
        self.scheduler.add_request(req)
        return req.request_id

    def add_prefilled_request(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str,
                              arrival_time: float, first_token: int, first_token_time: float,
                              load_kv: Callable[[list[int], int], None],
                              generator_state=None) -> StepOutput | None:
        """Admit a request whose prompt another engine computed (prefill/decode disaggregation; n = 1), with
        its first token -> that token's delta, or None if the pool is full now (retry after a step).
        ``load_kv(block_table, num_cached)`` writes the K/V after the prefix-cache hit; ``generator_state``
        continues the prefill side's sampler. vLLM: ``kv_transfer/kv_connector/v1/`` (docs/parallelism.md)."""
        params = params or SamplingParams()
        if params.n > 1 or params.prompt_logprobs is not None:
            raise ValueError("a prefilled request must have n=1 and no prompt_logprobs (its prompt ran elsewhere)")
        if isinstance(self.runner.kv_manager, KVCacheCoordinator):
            raise ValueError("a prefilled request needs one block table; this model has one per KV group")
        req = self._new_request(list(prompt_token_ids), params, request_id, arrival_time)
        hit = self.scheduler.add_computed(req)
        if hit is None:
            return None
        load_kv(self.runner.kv_manager.block_table(req.request_id), hit)
        if generator_state is not None:
            req.generator.set_state(generator_state)
        self._track(req)
        return self._append_token(req, int(first_token), first_token_time)

    def _new_request(self, prompt, params, request_id, arrival_time) -> Request:
        """Validate a prompt and its parameters -> a new ``Request`` (not queued yet)."""
        params = params or SamplingParams()
        check_prompt(prompt)                                       # exact types (minfer/validation.py)
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs an engine with a tokenizer")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer; pass token ids instead")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, ids = None, [int(t) for t in prompt]
        vocab = self.runner.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}")
        check_context(len(ids), self.max_model_len)
        kv = self.runner.kv_manager
        max_new = min(params.max_tokens, self.max_model_len - len(ids))
        need, pool = kv.max_blocks(len(ids), max_new, params.n), kv.pool    # coordinator: per KV group
        if need > pool.num_blocks:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) x n ({params.n}) "
                             f"needs {need} KV blocks, but the KV cache pool has only num_blocks={pool.num_blocks} "
                             f"(raise kv_cache_memory_bytes or lower max_tokens)")
        if request_id is not None and request_id in self.samples:
            raise ValueError(f"request_id {request_id!r} was already added")
        while request_id is None or request_id in self.samples:       # a fresh id
            request_id = f"req-{next(self._ids)}"
        return Request(request_id, ids, params, self.clock() if arrival_time is None else arrival_time,
                       eos_token_ids=self.eos_token_ids, prompt=text,
                       matcher=new_matcher(params, self.tokenizer, vocab, self.eos_token_ids))

    def _track(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.samples.setdefault(req.client_id, []).append(req)
        if self.tokenizer is not None:
            self._text[req.request_id] = TextOutput(self.tokenizer, req.params.stop)

    def abort(self, request_id: str) -> bool:
        """Stop a request (all its samples) now, waiting or running; blocks are freed.
        -> True if a sample was still unfinished (unknown or finished request: a no-op, False)."""
        live = [r for r in self.samples.get(request_id, []) if not r.is_finished]
        for req in live:
            self.scheduler.abort(req)
            req.stats.finish_time = self.clock()
        return bool(live)

    def release(self, request_id: str) -> list[Request] | None:
        """Forget a finished request (a server's memory stays flat): drop its samples and text state and
        return them, or None (keeping all) if it is unknown or unfinished. vLLM: ``OutputProcessor``."""
        samples = self.samples.get(request_id)
        if samples is None or not all(r.is_finished for r in samples):
            return None
        del self.samples[request_id]
        for r in samples:
            self.requests.pop(r.request_id, None)
            self._text.pop(r.request_id, None)
        return samples

    # Plain reads of list lengths and counters: safe to read from another thread as a snapshot.
    @property
    def num_running(self) -> int:
        """Sequences holding KV blocks (a request with n > 1 counts n once it has forked)."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission (preempted ones included)."""
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> tuple[int, int]:
        """(KV blocks held by sequences, KV blocks in the pool)."""
        pool = self.runner.kv_manager.pool
        return pool.num_blocks - pool.num_free_blocks, pool.num_blocks

    @property
    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache at admission, tokens found there) so far: vLLM's
        ``prefix_cache_queries`` / ``prefix_cache_hits``; a preempted request counts again."""
        return self.scheduler.prefix_cache_queries, self.scheduler.prefix_cache_hits

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def no_more_requests(self, value: bool = True) -> None:
        """Tell static/dynamic batching that nothing else is coming: a short last batch may start."""
        self.scheduler.no_more_requests = value

    def step(self) -> list[StepOutput]:
        """Schedule, run one forward, sample, check stops. Returns the streaming deltas."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self.num_steps += 1
        # Requests whose every token is now computed produce a token this step.
        rows = [i for i, c in enumerate(out.chunks) if c.request.num_computed_tokens == c.request.num_tokens]
        flat, spans = prompt_rows(out.chunks)                                  # prompt_logprobs: more rows
        logits = self.runner.execute(out.chunks, rows, flat) if flat else self.runner.execute(out.chunks, rows)
        if flat:                                                               # (len(rows) + len(flat), V)
            record_prompt(logits[len(rows):], spans, self._decode)
            logits = logits[:len(rows)]                                        # (len(rows), V)
        self.scheduler.commit(out)
        now = self.clock()
        reqs, row_of = [], []
        for r, i in enumerate(rows):
            req = out.chunks[i].request
            group = [req] + (self._fork(req) if req.params.n > 1 and req.num_output_tokens == 0 else [])
            reqs += group
            row_of += [r] * len(group)
        if row_of != list(range(len(logits))):                                 # n > 1: a row per sample
            logits = logits.index_select(0, to_device(row_of, logits.device, torch.long))
        logits = mask_logits(logits, [r.matcher for r in reqs])            # guided rows: the grammar's mask
        # the step's one host sync: the sampled token ids come back (tests/test_cuda_graph.py)
        toks = sample_rows(logits, [r.params for r in reqs], [r.generator for r in reqs]).tolist()
        record_sampled(logits, reqs, toks, self.logprobs_mode, self._decode)   # only rows that ask
        return [self._append_token(req, tok, now) for req, tok in zip(reqs, toks)]

    def _fork(self, parent: Request) -> list[Request]:
        """Parallel sampling: samples 1..n-1 share the parent's computed prompt blocks (see the docstring)."""
        children = []
        for i in range(1, parent.params.n):
            seed = None if parent.params.seed is None else parent.params.seed + i
            child = Request(f"{parent.request_id}#{i}", parent.prompt_token_ids,
                            dataclasses.replace(parent.params, seed=seed), parent.arrival_time,
                            eos_token_ids=parent.eos_token_ids, prompt=parent.prompt,
                            group_id=parent.request_id, index=i,
                            matcher=parent.matcher.deep_copy() if parent.matcher is not None else None)
            child.stats.first_scheduled_time = parent.stats.first_scheduled_time
            self._track(child)
            self.scheduler.fork(parent, child)
            children.append(child)
        return children

    def _append_token(self, req: Request, tok: int, now: float) -> StepOutput:
        req.output_token_ids.append(tok)
        req.stats.record_token(now)
        reason = finish_reason(tok, req.stop_token_ids, req.num_output_tokens, req.num_tokens,
                               req.params.max_tokens, self.max_model_len)
        stop_token = reason == "stop"
        if req.matcher is not None and advance(req.matcher, tok) and reason is None:
            reason = "stop"                                                 # the grammar is complete
        status = {None: None, "stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}[reason]
        new_text = ""
        text = self._text.get(req.request_id)
        if text is not None:
            new_text, hit = text.add(tok, stop_token)
            if status is not None and not hit:
                new_text += text.finish()
            if text.cut:
                status = RequestStatus.FINISHED_STOPPED
            req.text = text.text
        if status is not None:
            self.scheduler.finish(req, status)
            req.stats.finish_time = now
        return StepOutput(req.client_id, [tok], new_text, status is not None,
                          status.value if status is not None else None, req.index,
                          req.logprobs[-1:] if req.logprobs else None)

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
        """Offline use: add every prompt now, run to completion, return the requests (sample 0 of each)."""
        prompts, params = pair_prompts(prompts, params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        before = self.scheduler.no_more_requests
        self.no_more_requests(True)
        try:
            self.run()
        finally:
            self.no_more_requests(before)
        return [self.requests[i] for i in ids]


def _batch_invariant(model, runner: ModelRunner, on: bool, prefix_caching: bool) -> None:
    """Each sequence's numbers independent of the others in its steps (vLLM: ``VLLM_BATCH_INVARIANT=1``;
    SGLang: ``--enable-deterministic-inference``); what it takes here: docs/kernels.md, "Batch invariance"."""
    from minfer.kernels.onednn_linear import PackedLinear
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in packed:
        m.min_rows = 2 if on else 1          # oneDNN reduces a lone row in another order than 2+ rows
    dtype, kernel = model.model.embed_tokens.weight.dtype, runner.cache.decode_kernel
    eager = runner.static is None                    # the static step pads decodes to the longest context
    if on and not (packed and dtype == torch.bfloat16 and kernel == "cpu" and eager and not prefix_caching):
        raise ValueError(f"batch_invariant=True runs bfloat16 on oneDNN-packed linears (a CPU with bf16 units) in "
                         f"eager steps, decode_kernel 'cpu', enable_prefix_caching=False; got {dtype}, {len(packed)} "
                         f"packed linears, eager {eager}, decode kernel {kernel!r}, prefix caching {prefix_caching}")


# --- Online serving of a trace: requests arrive at their times while the engine steps ---
def run_trace(engine: LLMEngine, trace, make_params: Callable[[object], SamplingParams],
              sleep: Callable[[float], None] = time.sleep, on_output: Callable[[StepOutput], None] | None = None,
              ) -> tuple[list[Request], float]:
    """Replay ``trace`` (``workload.TraceRequest``s) against ``engine`` in real time -> (the requests in
    trace order, first arrival -> last finish). A request is stamped with its trace arrival time even
    during a step (the wait counts in its TTFT); idle, the loop sleeps until the next arrival (``sleep``
    may advance a fake clock). docs/measuring.md."""
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
