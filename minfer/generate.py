"""One request, start to finish: prefill once, then decode token by token.
The primitives every single-request loop reuses (``forward_tokens``, ``StopRule``); ``kv_cache="none"``
recomputes everything, as the oracle. The batched engine is ``minfer/engine`` (docs/architecture.md).
"""
import time
from typing import Callable, Iterator

import torch

from minfer.kv import make_cache
from minfer.metrics import RequestStats
from minfer.sampling import SamplingParams, finish_reason, make_generator, sample, stop_token_ids
from minfer.validation import check_context


class StopRule:
    """When a request ends (``sampling.finish_reason``, the engine's rule too): ``emit(tok)`` counts one
    new token (stamped in ``metrics``); ``done`` turns True on the token that ends it, ``reason`` says why."""

    def __init__(self, model, prompt_ids, params: SamplingParams, eos_token_ids=(),
                 metrics: RequestStats | None = None, clock: Callable[[], float] = time.perf_counter):
        check_context(len(prompt_ids), model.cfg.max_position_embeddings)
        self.max_new = min(params.max_tokens, model.cfg.max_position_embeddings - len(prompt_ids))
        self.total = len(prompt_ids) + self.max_new          # positions the cache must hold
        self.stop_ids = stop_token_ids(params, eos_token_ids)
        self.num_prompt, self.max_tokens = len(prompt_ids), params.max_tokens
        self.max_model_len = model.cfg.max_position_embeddings
        self.reason: str | None = None                       # "stop" or "length" once done
        self.produced = 0
        self.done = False
        self.metrics, self.clock = metrics, clock
        if metrics is not None:
            metrics.num_prompt_tokens = len(prompt_ids)

    @property
    def room(self) -> int:
        """Tokens that may still be proposed after the next one (speculative decoding's budget)."""
        return self.max_new - self.produced - 1

    def emit(self, tok: int) -> None:
        self.produced += 1
        if self.metrics is not None:
            self.metrics.record_token(self.clock())
        self.reason = finish_reason(tok, self.stop_ids, self.produced, self.num_prompt + self.produced,
                                    self.max_tokens, self.max_model_len)
        self.done = self.reason is not None


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    return model.inv_freq.device, model.model.embed_tokens.weight.dtype


def forward_tokens(model, cache, ids: list[int], start: int, attention="sdpa", last_only=False) -> torch.Tensor:
    """Run ``ids`` at positions start.. through ``model`` with ``cache``: logits (T, V) (or (1, V))."""
    device, _ = model_device_dtype(model)
    x = torch.tensor([ids], device=device)                                   # (1, T)
    pos = torch.arange(start, start + len(ids), device=device)[None]         # (1, T)
    return model(x, pos, kv_cache=cache, attention=attention, last_only=last_only)[0]


@torch.no_grad()
def generate_tokens(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_token_ids: list[int] = (),
    kv_cache: str = "contiguous",       # "contiguous" | "static" | "sliding" | "int8" | "fp8" | "none"
    attention: str = "sdpa",
    prefill_chunk: int | None = None,   # chunked prefill: feed the prompt this many tokens at a time
    metrics: RequestStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """Yield new token ids until EOS / a stop token / max_tokens / the context limit."""
    rule = StopRule(model, prompt_ids, params, eos_token_ids, metrics, clock)
    device, dtype = model_device_dtype(model)
    cache = None if kv_cache == "none" else make_cache(kv_cache, model.cfg, 1, rule.total, dtype=dtype,
                                                       device=device)
    static = None
    if kv_cache == "static":       # fixed-shape decode steps: a CUDA graph on a GPU (see kv/static.py)
        from minfer.engine.cuda_graph import StaticSingleDecode
        static = StaticSingleDecode(model, cache, attention)     # before the prefill (its warm-up writes slot 0)
    gen = make_generator(params.seed)

    # ---- prefill: the whole prompt (in chunks if asked), logits for the last position only
    chunk = prefill_chunk or len(prompt_ids)
    for s in range(0, len(prompt_ids), chunk):
        logits = forward_tokens(model, cache, prompt_ids[s:s + chunk], s, attention, last_only=True)[-1]
    seq = list(prompt_ids)
    while True:
        tok = sample(logits, params, gen)
        seq.append(tok)
        rule.emit(tok)
        yield tok
        if rule.done:
            break
        # ---- decode: one token in, reading K/V of everything before it from the cache
        if static is not None:                   # the same forward, replayed on static buffers
            logits = static.step(tok, len(seq) - 1)
        elif cache is not None:
            logits = forward_tokens(model, cache, [tok], len(seq) - 1, attention, last_only=True)[-1]
        else:
            logits = forward_tokens(model, None, seq, 0, attention, last_only=True)[-1]
