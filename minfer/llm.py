"""The public entry point, named as in vLLM: ``LLM(...).generate(prompts, SamplingParams(...))``.

    llm = LLM("smollm2-135m-instruct")
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    out.text, out.token_ids, out.finish_reason, out.metrics.ttft
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from minfer.checkpoints import load_checkpoint
from minfer.generate import RequestMetrics, generate_tokens
from minfer.model import build_model
from minfer.sampling import SamplingParams, pair_prompts
from minfer.tokenizer import IncrementalDetokenizer
from minfer.validation import check_engine_args, check_messages, check_prompt, check_prompts

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


@dataclass
class RequestOutput:
    """What one prompt produced."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS, stop token or stop string) or "length"
    metrics: RequestMetrics
    spec_stats: object | None = None   # minfer.speculative.SpecStats when LLM(speculative=...) is set

    @property
    def ttft(self) -> float | None:
        return self.metrics.ttft

    @property
    def tpot(self) -> float | None:
        return self.metrics.tpot

    @property
    def tokens_per_s(self) -> float | None:
        return self.metrics.decode_tokens_per_s


class LLM:
    """Load a model once, generate many times."""

    def __init__(self, model: str = "smollm2-135m-instruct", device: str | None = None,
                 dtype: str | torch.dtype = "float32", attention: str = "sdpa",
                 kv_cache: str = "contiguous", prefill_chunk: int | None = None, seed: int = 0,
                 quantization: str | None = None, speculative=None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1):
        check_engine_args(device, kv_cache, prefill_chunk, seed)   # fail now, not at generate time
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        from minfer.attention import get_backend
        get_backend(attention)                                    # fail early on a bad name
        spec_config = None
        if speculative is not None:                               # fail early on a bad spec string
            from minfer.speculative import SpeculativeConfig
            spec_config = SpeculativeConfig.parse(speculative)
        from minfer.quant.apply import is_quantized_checkpoint, load_quantized_folder, parse_spec, quantize_model
        if quantization is not None:
            parse_spec(quantization)                              # fail early on a bad name
        self.driver = None                                        # minfer.distributed: rank 0 of a group
        if tensor_parallel_size > 1 or pipeline_parallel_size > 1:
            from minfer.distributed.runtime import ParallelConfig, start_driver
            if quantization is not None or spec_config is not None:
                raise ValueError("tensor/pipeline parallelism runs without quantization and speculative decoding")
            cfg, self.model, tokenizer, self.driver = start_driver(
                model, ParallelConfig(tensor_parallel_size, pipeline_parallel_size), self.dtype, self.device)
        elif is_quantized_checkpoint(model):                      # written by `minfer quantize`
            if quantization is not None:
                raise ValueError(f"{model} is already quantized; leave quantization unset")
            cfg, self.model, tokenizer = load_quantized_folder(model, device=self.device, dtype=self.dtype)
        else:
            cfg, state_dict, tokenizer = load_checkpoint(model, dtype=self.dtype, device="cpu")
            self.model = build_model(cfg, state_dict, device=self.device, dtype=self.dtype)
            if quantization is not None:                          # weight-only: swap the linears
                quantize_model(self.model, quantization)
        self.config, self.tokenizer = cfg, tokenizer
        self.attention, self.kv_cache, self.prefill_chunk = attention, kv_cache, prefill_chunk
        self.model_name = model
        # speculative decoding (minfer/speculative): "prompt_lookup", "draft:<model>", "lookahead", ...
        self.speculative, self.draft = spec_config, None
        if spec_config is not None and spec_config.method == "draft":
            from minfer.speculative import load_draft
            self.draft = load_draft(self.model, spec_config.draft_model)

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got {bad[:5]}")
        return None, ids

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               on_text: Callable[[str], None] | None = None) -> RequestOutput:
        """Generate for one prompt, calling ``on_text`` with each new piece of text as it appears."""
        params = params or SamplingParams()
        check_prompt(prompt)
        text_prompt, prompt_ids = self._encode(prompt)
        metrics = RequestMetrics(arrival_time=time.perf_counter())
        detok = IncrementalDetokenizer(self.tokenizer)
        text, token_ids, finish = "", [], "length"
        emitted = 0
        hold = max((len(s) for s in params.stop), default=1) - 1  # text that might start a stop string
        spec_stats = None
        if self.speculative is None:
            tokens = generate_tokens(self.model, prompt_ids, params,
                                     eos_token_ids=self.tokenizer.eos_token_ids, kv_cache=self.kv_cache,
                                     attention=self.attention, prefill_chunk=self.prefill_chunk,
                                     metrics=metrics)
        else:
            from minfer.speculative import SpecStats, generate_speculative
            spec_stats = SpecStats()
            tokens = generate_speculative(self.model, prompt_ids, params, self.speculative, draft=self.draft,
                                          eos_token_ids=self.tokenizer.eos_token_ids, kv_cache=self.kv_cache,
                                          attention=self.attention, stats=spec_stats, metrics=metrics)
        if self.driver is not None:        # the other ranks run the same loop, in step with this one
            tokens = self.driver.run({"prompt_ids": prompt_ids, "params": params, "kv_cache": self.kv_cache,
                                      "eos_token_ids": self.tokenizer.eos_token_ids, "attention": self.attention,
                                      "prefill_chunk": self.prefill_chunk}, tokens)
        for tok in tokens:
            token_ids.append(tok)
            text += detok.add(tok)
            if tok in params.stop_token_ids or (not params.ignore_eos and tok in self.tokenizer.eos_token_ids):
                finish = "stop"
                break
            hits = [text.find(s) for s in params.stop if s in text]
            if hits:
                text, finish = text[:min(hits)], "stop"
                break
            safe = len(text) - hold                               # never stream part of a stop string
            if on_text and safe > emitted:
                on_text(text[emitted:safe])
                emitted = safe
        else:
            text += detok.flush()
        tokens.close()                     # end the loop now (a parallel driver tells its followers)
        if on_text and len(text) > emitted:
            on_text(text[emitted:])
        metrics.finish_time = time.perf_counter()
        return RequestOutput(text_prompt, prompt_ids, text, token_ids, finish, metrics, spec_stats)

    # ------------------------------------------------------------------ vLLM API
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists); one output per prompt."""
        check_prompts(prompts)
        prompts, params = pair_prompts(prompts, params)
        return [self.stream(p, sp) for p, sp in zip(prompts, params)]

    def chat(self, messages, params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation (list of {"role", "content"}) or a list of them."""
        conversations = check_messages(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, params)

    def stream_chat(self, messages, params=None, on_text=None) -> RequestOutput:
        return self.stream(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           params, on_text)
