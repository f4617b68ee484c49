"""The propose / verify loop of draft-model speculation and prompt lookup, for one request.

Between steps the target's cache holds K/V for ``seq[:-1]``; after verifying n of k proposals,
``truncate(len(seq) + n)``. ``engine.py`` runs the same steps for the whole batch.
"""
import time
from typing import Callable, Iterator

import torch

from minfer.metrics import RequestStats
from minfer.generate import StopRule, forward_tokens, model_device_dtype
from minfer.kv import make_cache
from minfer.sampling import SamplingParams, make_generator, sample
from minfer.speculative.rejection import processed_probs, verify_greedy, verify_sampled
from minfer.speculative.stats import SpecStats

ROLLBACK_CACHES = ("contiguous", "int8", "fp8")    # caches whose truncate() is a true rollback


class Proposer:
    """Guesses the next tokens (``begin`` and ``accepted`` do nothing unless overridden). ``q`` is None for
    a deterministic guess (no draft distribution)."""

    def begin(self, prompt_ids: list[int], max_len: int) -> None:
        """A new request starts (at most ``max_len`` tokens in all)."""

    def propose(self, seq: list[int], k: int, params: SamplingParams,
                generator: torch.Generator) -> tuple[list[int], torch.Tensor | None]: ...

    def accepted(self, seq: list[int]) -> None:
        """The verified sequence after a step (a draft model rolls its own cache back to it)."""


def emit(budget: StopRule, tokens: list[int]) -> Iterator[int]:
    """Yield ``tokens`` one by one, counted by ``budget``, until it says done."""
    for tok in tokens:
        budget.emit(tok)
        yield tok
        if budget.done:
            return


def new_cache(model, kind: str, max_len: int):
    if kind not in ROLLBACK_CACHES:
        raise ValueError(f"speculative decoding needs a KV cache that can roll back; kv_cache={kind!r} "
                         f"cannot (choose one of {', '.join(ROLLBACK_CACHES)})")
    device, dtype = model_device_dtype(model)
    return make_cache(kind, model.cfg, 1, max_len, dtype=dtype, device=device)


@torch.no_grad()
def speculative_generate(
    target,
    prompt_ids: list[int],
    params: SamplingParams,
    proposer: Proposer,
    *,
    num_speculative_tokens: int = 4,
    eos_token_ids: list[int] = (),
    kv_cache: str = "contiguous",
    attention: str = "sdpa",
    stats: SpecStats | None = None,
    metrics: RequestStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """Yield new token ids, like ``minfer.generate.generate_tokens``, k proposals per target forward."""
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    budget = StopRule(target, prompt_ids, params, eos_token_ids, metrics, clock)
    cache = new_cache(target, kv_cache, budget.total)
    gen = make_generator(params.seed)
    stats = stats if stats is not None else SpecStats()
    proposer.begin(list(prompt_ids), budget.total)

    # ---- prefill, then the first token by plain sampling
    logits = forward_tokens(target, cache, list(prompt_ids), 0, attention, last_only=True)[-1]
    seq = list(prompt_ids) + [sample(logits, params, gen)]
    yield from emit(budget, seq[-1:])
    while not budget.done:
        # ---- propose (never beyond the budget), then score [last, d_1..d_k] in one forward
        k = min(num_speculative_tokens, budget.room)
        draft, q = proposer.propose(seq, k, params, gen) if k > 0 else ([], None)
        draft, q = list(draft)[:k], None if q is None else q[:k]
        logits = forward_tokens(target, cache, [seq[-1]] + draft, len(seq) - 1, attention)  # (k+1, V)
        if params.greedy:
            emitted = verify_greedy(logits.argmax(-1).tolist(), draft)
        else:
            emitted = verify_sampled(processed_probs(logits, params), q, draft, gen)
        n = len(emitted) - 1
        stats.record(len(draft), n)
        cache.truncate(len(seq) + n)                 # keep seq + d_1..d_n; forget rejected K/V
        seq += emitted
        proposer.accepted(seq)
        yield from emit(budget, emitted)
