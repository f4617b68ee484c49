"""One engine loop, many clients: the engine steps in a background thread, handlers await queues.
Only the engine thread touches the engine (public API only); the event loop puts commands on a
queue and reads per-request ``asyncio.Queue``s. vLLM: ``AsyncLLM`` (``vllm/v1/engine/async_llm.py``)
and ``EngineCore`` (``vllm/v1/engine/core.py``). The diagram: docs/serving.md.
"""
import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from minfer.sampling import SamplingParams
from minfer.engine import LLMEngine, StepOutput

log = logging.getLogger("minfer.serve")

METRICS = (    # attribute of EngineMetrics, type, name (after "minfer:"), help[, histogram buckets in s]
    ("ttft", Histogram, "time_to_first_token_seconds", "TTFT: arrival -> first token",
     (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)),
    ("tpot", Histogram, "time_per_output_token_seconds", "TPOT: mean gap after the first token",
     (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)),
    ("e2e", Histogram, "e2e_request_latency_seconds", "arrival -> finish",
     (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)),
    ("running", Gauge, "num_requests_running", "requests holding KV blocks"),
    ("waiting", Gauge, "num_requests_waiting", "requests queued for admission"),
    ("kv_usage", Gauge, "kv_cache_usage_perc", "fraction of KV blocks in use (0..1)"),
    ("kv_used", Gauge, "kv_cache_used_blocks", "KV blocks held by requests"),
    ("kv_total", Gauge, "kv_cache_total_blocks", "KV blocks in the pool"),
    ("prefix_queries", Counter, "prefix_cache_queries", "prompt tokens looked up in the prefix cache"),
    ("prefix_hits", Counter, "prefix_cache_hits", "prompt tokens found in the prefix cache"),
    ("hit_rate", Gauge, "prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries"),
    ("preemptions", Counter, "num_preemptions", "requests preempted (KV recomputed later)"),
    ("aborted", Counter, "request_aborted", "requests aborted before they finished (client gone)"),
    ("prompt_tokens", Counter, "prompt_tokens", "prompt tokens of finished requests"),
    ("generation_tokens", Counter, "generation_tokens", "generated tokens"),
)


@dataclass
class Output:
    """What a handler receives: a delta of one sample, and on its last one that sample's usage counts."""

    text: str
    token_ids: list[int]
    finished: bool                       # this sample is done (a request with n samples gets n of these)
    finish_reason: str | None
    index: int = 0                       # which of the request's n samples (OpenAI's choice index)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None             # the engine failed: the request ends with this message
    logprobs: list | None = None         # the new tokens' logprob dicts, when the request asked
    prompt_logprobs: list | None = None  # on a sample's first delta, when the request asked


class EngineMetrics:
    """The server's /metrics (vLLM: ``vllm/v1/metrics/loggers.py``, ``PrometheusStatLogger``)."""

    def __init__(self, r: CollectorRegistry):
        for attr, kind, name, doc, *buckets in METRICS:
            extra = {"buckets": buckets[0]} if buckets else {}
            setattr(self, attr, kind(f"minfer:{name}", doc, registry=r, **extra))
        self.finished = Counter("minfer:request_success", "finished requests", ["finish_reason"], registry=r)
        self.hits = self.queries = 0           # the engine's totals already added to the counters


class AsyncEngine:
    """``submit`` / ``abort`` from asyncio; the engine runs in its own thread (``start`` / ``stop``)."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int = 64, registry: CollectorRegistry | None = None):
        self.engine, self.tokenizer, self.max_waiting = engine, engine.tokenizer, max_waiting
        self.max_model_len = int(min(engine.max_model_len, 2**31))
        self.registry = registry or CollectorRegistry()
        self.metrics = EngineMetrics(self.registry)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: set[str] = set()      # submitted, not yet handed to the engine
        self._thread = threading.Thread(target=self._run, name="minfer-engine", daemon=True)
        self._update_gauges()

    # --- the event-loop side ---
    @property
    def num_waiting(self) -> int:
        """Requests accepted but not running: queued commands plus the engine's waiting queue (a snapshot)."""
        return len(self._pending) + self.engine.num_waiting

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a request; returns its output queue. ValueError if the engine refuses it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._streams[request_id] = (loop, q)
        self._pending.add(request_id)
        self._commands.put(("add", request_id, prompt_token_ids, params, accepted))
        try:
            await accepted
        except BaseException:                 # refused, or the client left before the engine saw it
            self.abort(request_id)
            raise
        return q

    def abort(self, request_id: str) -> None:
        """Stop a request (the engine frees its blocks); safe to call for a finished one."""
        self._commands.put(("abort", request_id))
        self.release(request_id)

    def release(self, request_id: str) -> None:
        """The handler is done with ``request_id``: stop delivering to it."""
        self._streams.pop(request_id, None)

    def abort_all(self, message: str) -> None:
        """End every request with an error (``message``): their streams send it as an error event."""
        self._commands.put(("abort_all", message))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running and end the engine thread."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    # --- the engine thread ---
    def _run(self) -> None:
        eng = self.engine
        while True:
            cmds = []
            with contextlib.suppress(queue.Empty):     # all queued commands; wait (0.1 s) only when idle
                while True:
                    idle = not (cmds or eng.has_unfinished_requests())
                    cmds.append(self._commands.get(block=idle, timeout=0.1))
            for c in cmds:
                if c[0] == "stop":
                    self._abort_all("the server is shutting down")
                    return
                self._handle(c)
            if eng.has_unfinished_requests():
                try:
                    outs = eng.step()
                except Exception as e:                     # a bug: fail these requests, keep serving
                    log.exception("engine step failed")
                    self._abort_all(f"engine error: {type(e).__name__}: {e}")
                    outs = []
                for out in outs:
                    self._deliver(out)
                for rid in {out.request_id for out in outs if out.finished}:   # after all of the step's deltas
                    self._forget(rid)
            self._update_gauges()

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, accepted = cmd
            err = None if rid in self._streams else asyncio.CancelledError()    # the client left already
            try:
                if err is None:
                    self.engine.add_request(ids, params, request_id=rid)
            except ValueError as e:
                err = e
            finally:                                      # after add_request: never counted as neither
                self._pending.discard(rid)
            accepted.get_loop().call_soon_threadsafe(_settle, accepted, err)
        elif cmd[0] == "abort_all":
            self._abort_all(cmd[1])
        elif cmd[0] == "abort":
            if self.engine.abort(cmd[1]):
                self.metrics.aborted.inc()
            self._forget(cmd[1])

    def _deliver(self, out: StepOutput) -> None:
        item = Output(out.new_text, list(out.new_token_ids), out.finished, out.finish_reason, out.index,
                      logprobs=out.logprobs)
        samples = self.engine.samples.get(out.request_id, [])
        if out.index < len(samples):
            req = samples[out.index]
            if out.finished:
                item.num_prompt_tokens, item.num_output_tokens = req.num_prompt_tokens, req.num_output_tokens
            if req.num_output_tokens == len(out.new_token_ids):          # its first delta
                item.prompt_logprobs = samples[0].prompt_logprobs
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(stream[1].put_nowait, item)

    def _forget(self, request_id: str) -> None:
        """Once every sample has finished: record the metrics and drop the request from the engine
        (a long-running server must not keep them). Aborted samples count in ``request_aborted`` only."""
        samples = self.engine.release(request_id)
        for req in samples or []:
            if req.finish_reason != "abort":
                self._record(req)

    def _abort_all(self, message: str) -> None:
        for rid in set(self._streams) | set(self.engine.samples):
            self.engine.abort(rid)
            self._forget(rid)
            loop, q = self._streams.get(rid, (None, None))
            if loop is not None:
                loop.call_soon_threadsafe(q.put_nowait, Output("", [], True, "abort", error=message))

    # --- metrics ---
    def _record(self, req) -> None:
        """One finished sample. Its prompt counts once per request (sample 0), as OpenAI's usage does."""
        m, s = self.metrics, req.stats
        for histogram, value in ((m.ttft, s.ttft), (m.tpot, s.tpot), (m.e2e, s.e2el)):
            if value is not None:
                histogram.observe(value)
        m.preemptions.inc(req.num_preemptions)
        m.finished.labels(req.finish_reason).inc()
        if req.index == 0:
            m.prompt_tokens.inc(req.num_prompt_tokens)
        m.generation_tokens.inc(req.num_output_tokens)

    def _update_gauges(self) -> None:
        eng, m = self.engine, self.metrics
        used, total = eng.kv_cache_usage
        for gauge, value in ((m.running, eng.num_running), (m.waiting, eng.num_waiting), (m.kv_used, used),
                             (m.kv_total, total), (m.kv_usage, used / total)):
            gauge.set(value)
        queries, hits = eng.prefix_cache_stats       # the engine's running totals -> counter increments
        if queries > m.queries:
            m.prefix_queries.inc(queries - m.queries)
            m.prefix_hits.inc(hits - m.hits)
            m.queries, m.hits = queries, hits
            m.hit_rate.set(hits / queries)


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if exc is None and not fut.done():
        fut.set_result(None)
    elif not fut.done():
        fut.set_exception(exc)


def build_engine(model: str, *, device: str | None = None, dtype: str = "float32",
                 quantization: str | None = None, **engine_args) -> LLMEngine:
    """Load ``model`` through ``LLM`` (``engine_args``: its keyword arguments) and return its engine."""
    from minfer.llm import LLM
    return LLM(model, device=device, dtype=dtype, quantization=quantization, **engine_args).engine
