"""Swap points: where a learner's function can replace the engine's, and run SmolLM2.

    from minfer.lessons import use
    with use(rms_norm=my_rms_norm, attention=my_attention):
        llm.generate("The capital of France is", SamplingParams(temperature=0))

    minfer generate "The capital of France is" --temperature 0 --use-solutions lessons/01_prefill_and_decode.ipynb

``SWAP_POINTS`` below is the whole list. Each entry names the exercise that
grades the function (so the learner knows the contract it must keep), and
the engine attributes it replaces, as ``"module:attribute"`` or
``"module:DICT[key]"``. The engine calls each of these through its module
(``rms_norm(...)`` inside ``minfer.model`` looks the name up at call time),
so replacing the attribute for the duration of ``use`` reroutes every call,
and leaving ``use`` restores the engine's own function even if generation
raised. A target that holds None is a hook: the engine runs its own code
unless a function is swapped in (``schedule_step``: the scheduler's policy
is a method, not a function, so ``Scheduler.schedule`` checks the hook and
adapts the learner's plain tuples to its requests). ``tests/test_swap.py``
checks that every target exists and holds the exercise's reference (or is
a hook), so a refactor that moves a function fails loudly here instead of
silently not swapping.

Not thread-safe: ``use`` changes module attributes for the whole process.
(tiny-llm does the same job with a learner package that mirrors the
reference package; here the engine stays one package and the seams are
declared in one table.)
"""
from __future__ import annotations

import importlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional


@dataclass(frozen=True)
class SwapPoint:
    """One seam of the engine a learner's function can take over."""

    name: str                 # the keyword of ``use(...)``
    targets: tuple[str, ...]  # engine attributes replaced: "module:attr" or "module:DICT[key]"
    exercise: Optional[str]   # the exercise whose check states the contract (None: see contract)
    contract: str             # the signature and invariants, in one line
    when: str                 # which runs of the engine actually call it


SWAP_POINTS: dict[str, SwapPoint] = {p.name: p for p in [
    SwapPoint("rms_norm", ("minfer.model:rms_norm",), "model.rms_norm",
              "rms_norm(x (..., d), weight (d,), eps) -> (..., d) float32",
              "every forward: two norms per layer and the final norm"),
    SwapPoint("attention", ("minfer.attention:BACKENDS[sdpa]", "minfer.attention:BACKENDS[reference]",
                            "minfer.attention:BACKENDS[flash]"), None,
              "attention(q (B, nh, T, hd), k, v (B, nkv, S, hd), q_pos (B, T), k_pos (B, S), "
              "window=None, scale=None) -> (B, nh, T, hd); key s visible to query t iff "
              "0 <= k_pos[s] <= q_pos[t] (and q_pos[t] - k_pos[s] < window)",
              "every forward with a contiguous cache or none (--attention any backend); "
              "the paged cache runs its own attention"),
    SwapPoint("top_p", ("minfer.sampling:top_p_filter", "minfer.speculative.rejection:top_p_filter"),
              "sampling.top_p", "top_p(logits (V,) or (B, V), top_p) -> logits, -inf outside the nucleus",
              "sampling with temperature > 0 (greedy never filters)"),
    SwapPoint("online_softmax_update", ("minfer.attention.flash:online_softmax_update",
                                        "minfer.attention.paged:online_softmax_update"),
              "attention.online_softmax_update",
              "online_softmax_update(m, l, acc, scores, values) -> (m, l, acc)",
              "--attention flash, and the paged cache's attention"),
    SwapPoint("slot_mapping", ("minfer.kv.block_pool:compute_slot_mapping",), "paged.slot_mapping",
              "slot_mapping(block_table, block_size, start_pos, num_tokens) -> list of slots",
              "--kv-cache paged: where each new token's K/V is written"),
    SwapPoint("schedule_step", ("minfer.engine.scheduler:schedule_step",), "serving.schedule_step",
              "schedule_step(running [(id, num_tokens, num_computed_tokens, num_blocks_held)], "
              "waiting [(id, num_tokens)], token_budget, max_num_seqs, num_free_blocks, block_size) "
              "-> (scheduled [(id, num_new_tokens)], preempted [id])",
              "every step of the serving engine (LLM.generate, minfer serve), whatever the policy; "
              "Scheduler._schedule_with carries the decisions out"),
]}


_TARGET = re.compile(r"^([\w.]+):(\w+)(?:\[(\w+)\])?$")


def _resolve(target: str) -> tuple[object, str, Optional[str]]:
    """``"module:attr"`` -> (module, attr, None); ``"module:DICT[key]"`` -> (module, DICT, key)."""
    m = _TARGET.match(target)
    if m is None:
        raise ValueError(f"bad swap target {target!r}: expected 'module:attr' or 'module:DICT[key]'")
    return importlib.import_module(m.group(1)), m.group(2), m.group(3)


def current(target: str) -> Callable:
    """What the engine calls at ``target`` right now."""
    module, attr, key = _resolve(target)
    value = getattr(module, attr)
    return value[key] if key is not None else value


def _set(target: str, fn: Callable) -> None:
    module, attr, key = _resolve(target)
    if key is None:
        setattr(module, attr, fn)
    else:
        getattr(module, attr)[key] = fn


# Engine functions replaced by the active ``use`` blocks: target -> the engine's own.
_ORIGINALS: dict[str, Callable] = {}


def original(target: str) -> Callable:
    """The engine's own function at ``target``, even inside ``use`` (the grader's reference)."""
    return _ORIGINALS[target] if target in _ORIGINALS else current(target)


@contextmanager
def use(**functions: Callable) -> Iterator[None]:
    """Run the engine with the learner's functions at the declared swap points.

    ``use(rms_norm=f)`` replaces every target of ``SWAP_POINTS["rms_norm"]``
    with ``f`` until the block ends (restored even on an exception); blocks
    nest. An unknown name or a non-callable value raises ``ValueError``
    before anything is replaced. A ``None`` value is skipped, so
    ``use(**maybe)`` works with functions that are not written yet.
    """
    functions = {k: v for k, v in functions.items() if v is not None}
    unknown = sorted(set(functions) - set(SWAP_POINTS))
    if unknown:
        raise ValueError(f"no swap point named {', '.join(unknown)}; the engine can run yours "
                         f"at: {', '.join(SWAP_POINTS)}")
    for name, fn in functions.items():
        if not callable(fn):
            raise ValueError(f"use({name}=...) needs a function, got {type(fn).__name__}")
    saved: list[tuple[str, Callable, bool]] = []
    try:
        for name, fn in functions.items():
            for target in SWAP_POINTS[name].targets:
                first = target not in _ORIGINALS
                if first:
                    _ORIGINALS[target] = current(target)
                saved.append((target, current(target), first))
                _set(target, fn)
        yield
    finally:
        for target, previous, first in reversed(saved):
            _set(target, previous)
            if first:
                del _ORIGINALS[target]


def compare_with_engine(llm, prompt: str, max_tokens: int = 16, **functions: Callable) -> bool:
    """Greedy-generate ``prompt`` with the engine's functions, then with yours; print both.

    Returns True when the two texts are identical: the whole model ran on
    your function and could not tell it from the engine's.
    """
    from minfer.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engine = llm.generate(prompt, params)[0]
    with use(**functions):
        yours = llm.generate(prompt, params)[0]
    same = engine.token_ids == yours.token_ids
    names = ", ".join(functions)
    print(f"prompt:           {prompt!r}")
    print(f"engine's {names}: {engine.text!r}")
    print(f"your {names}:     {yours.text!r}")
    print("identical tokens: the model ran on your code" if same else
          "the outputs differ: your function disagrees with the engine somewhere")
    return same
