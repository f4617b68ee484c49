"""Swap points: where a learner's function can replace the engine's, and run SmolLM2.

``SWAP_POINTS`` is the whole list (``targets``, replaced by ``use``; or an ``engine_arg`` of the
engine's constructor), held to the code by ``tests/test_swap.py``. Details: docs/teaching.md.
"""
import importlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from minfer.lessons import plug_ins


@dataclass(frozen=True)
class SwapPoint:
    """One seam of the engine a learner's function can take over."""

    name: str                 # the keyword of ``use(...)`` / ``engine_args(...)``
    targets: tuple[str, ...]  # engine attributes replaced by ``use``: "module:attr" or "module:DICT[key]"
    exercise: Optional[str]   # the exercise whose check states the contract (None: see contract)
    contract: str             # the signature and invariants, in one line
    when: str                 # which runs of the engine actually call it
    engine_arg: Optional[str] = None   # instead of targets: the ``LLMEngine.from_model`` argument


SWAP_POINTS: dict[str, SwapPoint] = {p.name: p for p in [
    SwapPoint("rms_norm", ("minfer.model:rms_norm",), "model.rms_norm",
              "rms_norm(x (..., d), weight (d,), eps) -> (..., d) float32",
              "every forward: two norms per layer and the final norm"),
    SwapPoint("attention", (), "attention.gqa_attention",
              "attention(q (B, nh, T, hd), k, v (B, nkv, S, hd), q_pos (B, T), k_pos (B, S), "
              "window=None, scale=None) -> (B, nh, T, hd); key s visible to query t iff "
              "0 <= k_pos[s] <= q_pos[t] (and q_pos[t] - k_pos[s] < window)",
              "every forward of an engine built with it: the paged cache gathers each group's K/V "
              "through the block tables and calls it (minfer/attention/paged.py)",
              engine_arg="attention"),
    SwapPoint("top_p", ("minfer.sampling:top_p_filter", "minfer.speculative.rejection:top_p_filter"),
              "sampling.top_p", "top_p(logits (V,) or (B, V), top_p) -> logits, -inf outside the nucleus",
              "sampling with temperature > 0 (greedy never filters)"),
    SwapPoint("online_softmax_update", ("minfer.attention.flash:online_softmax_update",
                                        "minfer.attention.paged:online_softmax_update"),
              "attention.online_softmax_update",
              "online_softmax_update(m, l, acc, scores, values) -> (m, l, acc)",
              "--attention flash, and the paged cache's block-by-block mode (attention_mode='online')"),
    SwapPoint("stream_cut", ("minfer.engine.output:stream_cut",), "output.stream_cut",
              "stream_cut(text, emitted, stop, final) -> (text cut before the first stop string, new text safe "
              "to stream, stopped)", "every request whose text is returned or streamed (engine, LLM, server)"),
    SwapPoint("slot_mapping", (), "paged.slot_mapping",
              "slot_mapping(block_table, block_size, start_pos, num_tokens) -> list of slots",
              "every step of an engine built with it: where each new token's K/V is written",
              engine_arg="kv_manager_cls"),
    SwapPoint("schedule_step", (), "serving.schedule_step",
              "schedule_step(running [(id, num_tokens, num_computed_tokens, num_blocks_held)], "
              "waiting [(id, num_tokens)], token_budget, max_num_seqs, num_free_blocks, block_size) "
              "-> (scheduled [(id, num_new_tokens)], preempted [id])",
              "every step of an engine built with it, whatever the policy",
              engine_arg="scheduler_cls"),
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


def _checked(caller: str, functions: dict) -> dict:
    """``functions`` without its None values; ValueError on an unknown name or a non-function."""
    functions = {k: v for k, v in functions.items() if v is not None}
    unknown = sorted(set(functions) - set(SWAP_POINTS))
    if unknown:
        raise ValueError(f"no swap point named {', '.join(unknown)}; the engine can run yours "
                         f"at: {', '.join(SWAP_POINTS)}")
    for name, fn in functions.items():
        if not callable(fn):
            raise ValueError(f"{caller}({name}=...) needs a function, got {type(fn).__name__}")
    return functions


def engine_args(**functions: Callable) -> dict:
    """``LLMEngine.from_model`` / ``LLM.from_model`` arguments that build an engine on the learner's
    functions at the constructor swap points (``slot_mapping``, ``schedule_step``)."""
    functions = _checked("engine_args", functions)
    modules = sorted(n for n in functions if not SWAP_POINTS[n].engine_arg)
    if modules:
        raise ValueError(f"{', '.join(modules)} replace module functions: run them with use(...)")
    return plug_ins.engine_args(**functions)


def split(functions: dict) -> tuple[dict, dict]:
    """(the functions ``use`` swaps in, the functions an engine is built with)."""
    functions = _checked("use", functions)
    built = {n: f for n, f in functions.items() if SWAP_POINTS[n].engine_arg}
    return {n: f for n, f in functions.items() if n not in built}, built


@contextmanager
def use(**functions: Callable) -> Iterator[None]:
    """Run the engine with the learner's functions: ``use(rms_norm=f)`` replaces every target of
    ``SWAP_POINTS["rms_norm"]`` with ``f`` until the block ends (even on an exception); blocks nest.
    An unknown name, a non-function or a constructor swap point raises ``ValueError`` before anything
    is replaced; a ``None`` value is skipped (``use(**maybe)``)."""
    functions, built = split(functions)
    if built:
        raise ValueError(f"{', '.join(built)} plug into the engine's constructor, not a module: build the "
                         f"engine with LLM.from_model(..., **engine_args({next(iter(built))}=...)), or "
                         f"call compare_with_engine")
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
    """Greedy-generate ``prompt`` with the engine's functions, then with yours; print both. True when
    the tokens are identical. A constructor swap point runs on a second engine (``plug_ins.rebuild``)."""
    from minfer.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    swapped, built = split(functions)
    engine = llm.generate(prompt, params)[0]
    with use(**swapped):
        yours = (plug_ins.rebuild(llm, **built) if built else llm).generate(prompt, params)[0]
    same = engine.token_ids == yours.token_ids
    names = ", ".join(functions)
    print(f"prompt:           {prompt!r}")
    print(f"engine's {names}: {engine.text!r}")
    print(f"your {names}:     {yours.text!r}")
    print("identical tokens: the model ran on your code" if same else
          "the outputs differ: your function disagrees with the engine somewhere")
    return same
