"""One request, start to finish: prefill once, then decode token by token.

    prompt ids ──prefill (one forward over the whole prompt, fills the KV cache)──> logits
         └──> sample ──> token ──decode (one forward over ONE token, reads the cache)──> ...

Prefill is compute-bound (a matrix-matrix product per weight); decode is
memory-bound (every weight is read to produce one token). ``kv_cache="none"``
recomputes the whole sequence each step instead: the same math as the oracle
in ``naive.py``, O(n) work per token, kept so lessons and benchmarks can show
what the cache buys.

The batched, many-request version of this loop lives in ``minfer/serving``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from minfer.kv import make_cache
from minfer.sampling import SamplingParams, make_generator, sample


@dataclass
class RequestMetrics:
    """Timestamps of one request (seconds, from ``clock``) and the figures derived from them."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    token_times: list[float] = field(default_factory=list, repr=False)

    def record_token(self, now: float) -> None:
        """One output token left the engine at ``now``."""
        self.token_times.append(now)
        self.first_token_time = self.first_token_time or now
        self.num_output_tokens += 1

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival -> first token out (includes the prefill)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - TTFT) / (n - 1), as vLLM's benchmark defines it."""
        if self.finish_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        tpot = self.tpot
        return None if not tpot else 1.0 / tpot


def check_context(num_prompt_tokens: int, max_context: int) -> None:
    if num_prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token")
    if num_prompt_tokens >= max_context:
        raise ValueError(f"the prompt has {num_prompt_tokens} tokens, but the model's context is "
                         f"{max_context} tokens (prompt + new tokens must fit)")


@torch.no_grad()
def generate_tokens(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_token_ids: list[int] = (),
    kv_cache: str = "contiguous",       # "contiguous" | "paged" | "sliding" | "int8" | "fp8" | "none"
    attention: str = "sdpa",
    prefill_chunk: int | None = None,   # chunked prefill: feed the prompt this many tokens at a time
    metrics: RequestMetrics | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """Yield new token ids until EOS / a stop token / max_tokens / the context limit."""
    if kv_cache == "paged":            # vLLM's block-table cache (minfer/kv/paged_generate.py)
        from minfer.kv.paged_generate import generate_paged
        yield from generate_paged(model, prompt_ids, params, eos_token_ids=eos_token_ids, attention=attention,
                                  prefill_chunk=prefill_chunk, metrics=metrics, clock=clock)
        return
    cfg = model.cfg
    device = model.inv_freq.device
    check_context(len(prompt_ids), cfg.max_position_embeddings)
    max_new = min(params.max_tokens, cfg.max_position_embeddings - len(prompt_ids))
    total = len(prompt_ids) + max_new
    dtype = model.model.embed_tokens.weight.dtype
    cache = None if kv_cache == "none" else make_cache(kv_cache, cfg, 1, total, dtype=dtype, device=device)
    gen = make_generator(params.seed)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    if metrics is not None:
        metrics.num_prompt_tokens = len(prompt_ids)

    def forward(ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], device=device)
        pos = torch.arange(start, start + len(ids), device=device)[None]
        return model(x, pos, kv_cache=cache, attention=attention, last_only=True)[0, -1]

    # ---- prefill: the whole prompt (in chunks if asked), logits for the last position only
    chunk = prefill_chunk or len(prompt_ids)
    for s in range(0, len(prompt_ids), chunk):
        logits = forward(prompt_ids[s:s + chunk], s)
    seq = list(prompt_ids)
    for step in range(max_new):
        tok = sample(logits, params, gen)
        seq.append(tok)
        if metrics is not None:
            metrics.record_token(clock())
        yield tok
        if tok in stop_ids or step == max_new - 1:
            break
        # ---- decode: one token in, reading K/V of everything before it from the cache
        logits = forward([tok], len(seq) - 1) if cache is not None else forward(seq, 0)
