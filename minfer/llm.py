"""The public entry point, named as in vLLM: ``LLM(...).generate(prompts, SamplingParams(...))``.

    llm = LLM("smollm2-135m-instruct")
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    out.text, out.token_ids, out.finish_reason, out.metrics.ttft     # the first sample
    out.outputs[i].text                                              # sample i of n (vLLM's shape)

``generate``, ``chat`` and ``stream`` submit requests to one ``LLMEngine`` that lives as long as
the ``LLM`` (its prefix cache too) and step it until they finish (vLLM: ``vllm/entrypoints/llm.py``).
Speculative decoding, tensor/pipeline parallelism and lookahead: docs/architecture.md.
"""
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from minfer.devices import DTYPES, resolve_device, resolve_dtype  # noqa: F401  (re-exported)
from minfer.engine.llm_engine import LLMEngine
from minfer.engine.output import TextOutput
from minfer.loading import load_model
from minfer.metrics import RequestStats
from minfer.sampling import SamplingParams, finish_reason, pair_prompts, stop_token_ids
from minfer.validation import check_engine_args, check_int, check_messages, check_prompt, check_prompts


@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's ``CompletionOutput``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS, stop token or stop string), "length" or "abort"
    metrics: RequestStats
    logprobs: list | None = None   # SamplingParams.logprobs: per token {id: Logprob} (minfer/logprobs.py)


@dataclass
class RequestOutput:
    """What one prompt produced: ``outputs[i]`` is sample i; ``text``, ``token_ids``... are sample 0's."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    spec_stats: object | None = None   # minfer.speculative.SpecStats when LLM(speculative=...) is set
    prompt_logprobs: list | None = None   # SamplingParams.prompt_logprobs: [None, {id: Logprob}, ...]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def metrics(self) -> RequestStats:
        return self.outputs[0].metrics

    @property
    def ttft(self) -> float | None:
        return self.metrics.ttft

    @property
    def tpot(self) -> float | None:
        return self.metrics.tpot

    @property
    def tokens_per_s(self) -> float | None:
        return self.metrics.decode_tokens_per_s


def _check_names(attention: str, decode_kernel: str, speculative):
    """Fail on a bad attention backend, decode kernel or speculative spec before loading -> SpeculativeConfig."""
    from minfer.attention import get_backend
    from minfer.attention.paged import DECODE_KERNELS
    get_backend(attention)
    if decode_kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {decode_kernel!r}")
    if speculative is None:
        return None
    from minfer.speculative import SpeculativeConfig
    return SpeculativeConfig.parse(speculative)


class LLM:
    """Load a model once, generate many times. The engine arguments are vLLM's (``EngineArgs``) plus ``prepack``
    (oneDNN CPU linears, fp32 or bf16), ``decode_kernel`` and ``batch_invariant``; each, its default and what
    it measured: docs/architecture.md. ``enforce_eager=None``: the static decode step (CUDA graphs) on CUDA or
    with ``compile=True``, eager on a CPU otherwise. ``seed``: requests without a seed draw one from it."""

    def __init__(self, model: str = "smollm2-135m-instruct", device: str | None = None,
                 dtype: str | torch.dtype = "float32", attention: str = "sdpa", *, seed: int = 0,
                 quantization: str | None = None, speculative=None, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, block_size: int = 16,
                 kv_cache_memory_bytes: int = 2**30, kv_cache_dtype: str = "auto", enforce_eager: bool | None = None,
                 compile: bool = False, max_seq_len_to_capture: int | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, prepack: bool | None = None,
                 decode_kernel: str = "auto", logprobs_mode: str = "raw_logprobs", batch_invariant: bool = False):
        check_engine_args(device, seed=seed, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                          kv_cache_dtype=kv_cache_dtype)           # fail now, not at generate time
        self.device, self.dtype, self.model_name = resolve_device(device), resolve_dtype(dtype), model
        spec_config = _check_names(attention, decode_kernel, speculative)
        if spec_config is not None:                               # verify steps and lookahead run eager
            if compile:
                raise ValueError("compile=True compiles the engine's decode step; speculative decoding runs eager")
            enforce_eager = True
        self.driver = None                                        # minfer.distributed: rank 0 of a group
        if tensor_parallel_size > 1 or pipeline_parallel_size > 1:
            cfg, tokenizer, enforce_eager = self._start_parallel(model, tensor_parallel_size, pipeline_parallel_size,
                                                                 quantization, spec_config, prepack, compile)
        else:                                                     # minfer/loading.py: every entry point's loader
            if prepack is None and (spec_config is not None or compile):
                prepack = False                                   # the default packs for the engine's steps only
            cfg, self.model, tokenizer = load_model(model, device=self.device, dtype=self.dtype,
                                                    quantization=quantization, prepack=prepack)
        self._set_speculative(spec_config)
        self._start(cfg, tokenizer, attention, seed, enable_prefix_caching=enable_prefix_caching,
                    max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                    block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                    kv_cache_dtype=kv_cache_dtype, enforce_eager=enforce_eager, compile=compile,
                    max_seq_len_to_capture=max_seq_len_to_capture, decode_kernel=decode_kernel,
                    logprobs_mode=logprobs_mode, batch_invariant=batch_invariant)

    def _start_parallel(self, model: str, tp: int, pp: int, quantization, spec_config, prepack, compile):
        """Make this process rank 0 of a tensor/pipeline-parallel group (``minfer/distributed/runtime.py``)
        -> (config, tokenizer, enforce_eager). The engine's steps are broadcast to the other ranks."""
        from minfer.distributed.runtime import ParallelConfig, start_driver
        if quantization is not None or spec_config is not None:
            raise ValueError("tensor/pipeline parallelism runs without quantization and speculative decoding")
        if prepack:
            raise ValueError(f"prepack is for one process on the CPU in float32 (got parallel {tp} x {pp})")
        if compile:       # every rank would have to capture the same graph, collectives included
            raise ValueError("compile=True is for one process; tensor/pipeline parallelism runs eager steps")
        cfg, self.model, tokenizer, self.driver = start_driver(model, ParallelConfig(tp, pp), self.dtype, self.device)
        return cfg, tokenizer, True

    @classmethod
    def from_model(cls, model, tokenizer=None, *, attention: str = "sdpa", seed: int = 0, speculative=None,
                   draft=None, **engine_args) -> "LLM":
        """An ``LLM`` around a model already in memory (``build_model``): tests, lessons, benchmarks.
        Without a tokenizer, prompts are token-id lists and outputs have no text. ``draft``: the
        draft model of ``speculative="draft:..."`` (loaded from its name when not given)."""
        self = cls.__new__(cls)
        w = model.model.embed_tokens.weight
        self.model, self.device, self.dtype, self.model_name = model, w.device, w.dtype, "in-memory"
        self.driver = None
        self._set_speculative(speculative, draft)
        self._start(model.cfg, tokenizer, attention, seed, **engine_args)
        return self

    def _set_speculative(self, spec_config, draft=None) -> None:
        """Speculative decoding (``minfer/speculative``): "prompt_lookup", "draft:<model>", "lookahead"..."""
        if spec_config is not None:
            from minfer.speculative import SpeculativeConfig
            spec_config = SpeculativeConfig.parse(spec_config)
        self.speculative, self.draft = spec_config, draft
        if spec_config is not None and spec_config.method == "draft" and draft is None:
            from minfer.speculative import load_draft
            self.draft = load_draft(self.model, spec_config.draft_model)

    def _start(self, cfg, tokenizer, attention: str, seed: int, *, kv_cache_memory_bytes: int = 2**30,
               kv_cache_dtype: str = "auto", enforce_eager: bool | None = None, compile: bool = False,
               max_seq_len_to_capture: int | None = None, **engine_args) -> None:
        """Build the engine: one for the LLM's lifetime, so its prefix cache lives as long. ``engine_args``:
        the rest of ``LLMEngine.from_model``'s (``num_blocks``, ``scheduler_cls``, ``logprobs_mode``, ...)."""
        if enforce_eager is None:                                 # vLLM's default on CUDA; see the docstring
            enforce_eager = not (self.device.type == "cuda" or compile) or (cfg.is_hybrid and not compile)
        if not enforce_eager and cfg.is_hybrid:     # its fixed-shape step masks every layer with one window
            raise ValueError("the static decode step (enforce_eager=False, compile=True) takes one window for "
                             "every layer; this model mixes local and global layers: use enforce_eager=True")
        if max_seq_len_to_capture is not None:
            check_int(max_seq_len_to_capture, "max_seq_len_to_capture", lo=1)
        self.config, self.tokenizer, self.attention = cfg, tokenizer, attention
        self.kv_cache_dtype, self.enforce_eager, self.compile = kv_cache_dtype, enforce_eager, compile
        self._seeds = torch.Generator().manual_seed(seed)
        engine_cls, spec = LLMEngine, {}
        if self.speculative is not None and self.speculative.method != "lookahead":
            from minfer.speculative.engine import SpecDecodeEngine    # proposals verified in the engine step
            engine_cls, spec = SpecDecodeEngine, {"speculative": self.speculative, "draft": self.draft}
        build = engine_cls.from_model
        if self.driver is not None:                  # rank 0 of a group: every step is broadcast to the others
            from minfer.distributed.engine import parallel_engine
            build = parallel_engine
        self.engine = build(self.model, tokenizer, **spec, kv_cache_memory=kv_cache_memory_bytes,
                            kv_cache_dtype=kv_cache_dtype, attention=attention,
                            eos_token_ids=() if tokenizer is None else None, enforce_eager=enforce_eager,
                            compile=compile, max_seq_len_to_capture=max_seq_len_to_capture, **engine_args)
        static = getattr(self.engine.runner, "static", None)
        self.compile_seconds = static.compile_seconds if static is not None else 0.0   # start-up, not steps
        self.capture_seconds = static.capture_seconds if static is not None else 0.0   # CUDA graphs

    def _encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got {bad[:5]}")
        return None, ids

    def seeded(self, params: SamplingParams) -> SamplingParams:
        """A request without a seed draws one from the LLM's seeded sequence (vLLM: ``LLM(seed=...)``)."""
        if params.seed is not None or params.greedy:
            return params
        return dataclasses.replace(params, seed=int(torch.randint(2**62, (), generator=self._seeds)))

    def _run(self, prompts: list, params: list[SamplingParams],
             on_text: Callable[[str], None] | None = None) -> list[RequestOutput]:
        """Submit every prompt to the engine, step until they finish, collect the outputs in order."""
        engine = self.engine
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(engine.add_request(p, self.seeded(sp)))
            engine.no_more_requests(True)
            while any(not r.is_finished for i in ids for r in engine.samples[i]):
                for delta in engine.step():
                    if on_text is not None and delta.new_text and delta.index == 0:
                        on_text(delta.new_text)
        except BaseException:
            for i in ids:                                         # leave the engine clean (Ctrl-C, errors)
                engine.abort(i)
            raise
        finally:
            engine.no_more_requests(False)
        outs = []
        for i in ids:
            spec_stats = getattr(engine, "spec_stats", {}).get(i)       # before release forgets it
            samples = sorted(engine.release(i), key=lambda r: r.index)
            first = samples[0]
            outs.append(RequestOutput(first.prompt, first.prompt_token_ids, [
                CompletionOutput(r.index, r.text, list(r.output_token_ids), r.finish_reason, r.stats, r.logprobs)
                for r in samples], spec_stats, first.prompt_logprobs))
        return outs

    def _run_single(self, prompt, params: SamplingParams, on_text=None) -> RequestOutput:
        """One prompt through the lookahead loop (``minfer/speculative``), with the engine's output processor."""
        from minfer.guided import refuse_speculative
        from minfer.speculative import SpecStats, generate_speculative
        if params.n != 1:
            raise ValueError("lookahead decoding samples one sequence per prompt; use n=1")
        refuse_speculative(params)
        text_prompt, prompt_ids = self._encode(prompt)
        metrics = RequestStats(arrival_time=time.perf_counter())
        stats, out = SpecStats(), TextOutput(self.tokenizer, params.stop)
        kv = "contiguous" if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
        eos = self.tokenizer.eos_token_ids
        stops = stop_token_ids(params, eos)
        tokens = generate_speculative(self.model, prompt_ids, params, self.speculative, draft=self.draft,
                                      eos_token_ids=eos, kv_cache=kv, attention=self.attention,
                                      stats=stats, metrics=metrics)
        token_ids, finish = [], None
        for tok in tokens:
            token_ids.append(tok)
            finish = finish_reason(tok, stops, len(token_ids), len(prompt_ids) + len(token_ids),
                                   params.max_tokens, self.config.max_position_embeddings)
            new, hit = out.add(tok, finish == "stop")
            if on_text and new:
                on_text(new)
            if hit or finish is not None:
                break
        tokens.close()
        new = out.finish()
        if on_text and new:
            on_text(new)
        finish = "stop" if out.cut else finish or "length"             # out.cut: a stop string
        metrics.finish_time = time.perf_counter()
        return RequestOutput(text_prompt, prompt_ids, [CompletionOutput(0, out.text, token_ids, finish, metrics)],
                             stats)

    def _check_logprobs(self, params: list[SamplingParams]) -> None:
        if self.speculative is not None and any(p.logprobs is not None or p.prompt_logprobs is not None
                                                for p in params):
            raise ValueError("SamplingParams.logprobs / prompt_logprobs are not available with speculative decoding")

    @property
    def _single_request_loop(self) -> bool:
        """Lookahead decoding runs prompt by prompt (see the module docstring)."""
        return self.speculative is not None and self.speculative.method == "lookahead"

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists); one output per prompt."""
        check_prompts(prompts)
        prompts, params = pair_prompts(prompts, params)
        self._check_logprobs(params)
        if self._single_request_loop:
            return [self._run_single(p, sp) for p, sp in zip(prompts, params)]
        return self._run(prompts, params)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               on_text: Callable[[str], None] | None = None) -> RequestOutput:
        """Generate for one prompt, calling ``on_text`` with each new piece of (sample 0's) text."""
        params = params or SamplingParams()
        check_prompt(prompt)
        self._check_logprobs([params])
        if self._single_request_loop:
            return self._run_single(prompt, params, on_text)
        return self._run([prompt], [params], on_text)[0]

    def chat(self, messages, params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate for one conversation ([{"role", "content"}, ...]) or a list of them, each encoded by
        ``Tokenizer.encode_chat`` (a message cannot forge a turn of another role)."""
        conversations = check_messages(messages)
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, params)

    def stream_chat(self, messages, params=None, on_text=None) -> RequestOutput:
        return self.stream(self.tokenizer.encode_chat(messages, add_generation_prompt=True), params, on_text)
