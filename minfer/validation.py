"""One place that checks what a user hands minfer through the Python API: sampling fields, prompts,
chat messages, engine arguments (OpenAI bodies: the pydantic models of ``minfer.serving.openai_api``).
As exact as those models: a bool is not a number, a float is not an integer, ``inf``/``nan`` are
refused, and every message names the field (``SamplingParams.seed must be an integer, got 'x'``).
ValueError for a bad value, TypeError for a value of the wrong kind altogether (``chat(dict)``).
"""
import contextlib
import math
import numbers
import os
from typing import Any

MAX_LOGPROBS = 20                  # top logprobs per token at most (vLLM's max_logprobs, OpenAI's limit)
SEED_MAX = 2**64 - 1               # torch.Generator.manual_seed takes any 64-bit value
KV_CACHE_DTYPES = ("auto", "int8", "fp8")          # LLM(kv_cache_dtype=...), as vLLM


def is_int(x: Any) -> bool:
    """An integer that is not a bool (``isinstance(True, int)`` is True in Python)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)     # numpy ints count


def is_real(x: Any) -> bool:
    """An int or float that is not a bool, and finite."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` must be an int (not a bool) in [lo, hi]; ValueError naming ``name``."""
    rule = "an integer" + ("" if lo is None else f" >= {lo}" if hi is None else f" in [{lo}, {hi}]")
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_real(value: Any, name: str, rule: str, ok) -> float:
    """``value`` must be a finite real number (not a bool) with ``ok(value)``."""
    if not is_real(value) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false (a bool), got {value!r}")
    return value


# --- sampling fields ---
def check_sampling_fields(f: dict[str, Any]) -> None:
    """Check the fields of a ``SamplingParams`` (names as in vLLM), given as a dict."""
    name = "SamplingParams.{}".format
    if "temperature" in f:
        check_real(f["temperature"], name("temperature"), "a finite number >= 0 (0 = greedy)", lambda x: x >= 0)
    if "top_p" in f:
        check_real(f["top_p"], name("top_p"), "a number in (0, 1]", lambda x: 0 < x <= 1)
    for key, lo in (("top_k", 0), ("max_tokens", 1), ("n", 1)):
        if key in f:
            check_int(f[key], name(key), lo=lo)
    for key, hi in (("seed", SEED_MAX), ("logprobs", MAX_LOGPROBS), ("prompt_logprobs", MAX_LOGPROBS)):
        if f.get(key) is not None:                      # None: not asked for
            check_int(f[key], name(key), lo=0, hi=hi)
    if "ignore_eos" in f:
        check_bool(f["ignore_eos"], name("ignore_eos"))
    stop = f.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise ValueError(f"{name('stop')} must be a string or a list of strings, got {stop!r}")
    if stop is not None and (stop == "" or any(s == "" for s in stop if not isinstance(stop, str))):
        raise ValueError(f"{name('stop')} must hold non-empty strings, got {stop!r}")
    ids = f.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, (list, tuple)) and all(is_int(i) and i >= 0 for i in ids)):
        raise ValueError(f"{name('stop_token_ids')} must be a list of token ids (integers >= 0), got {ids!r}")


# --- prompts and messages ---
def check_prompt(prompt: Any, name: str = "prompt") -> None:
    """One prompt: a str, or a list of token ids (ints, not bools, >= 0)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"{name} is bytes; decode it to str first (bytes are not token ids)")
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):   # a torch / numpy array of ids
        prompt = prompt.tolist()
        prompt = prompt if isinstance(prompt, list) else [prompt]
    if not isinstance(prompt, (list, tuple, range)):
        raise TypeError(f"{name} must be a str or a list of token ids, got {type(prompt).__name__}")
    bad = [t for t in prompt if not is_int(t) or t < 0]
    if bad:
        raise ValueError(f"{name}: token ids must be integers >= 0, got {bad[:5]!r}")


def check_context(num_prompt_tokens: int, max_context: int) -> None:
    """A tokenized prompt: at least one token, and room for one new token in the model's context.
    The one empty-prompt check: the engine's ``add_request`` and the single-request loops call it."""
    if num_prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token")
    if num_prompt_tokens >= max_context:
        raise ValueError(f"the prompt has {num_prompt_tokens} tokens, but the model's context is "
                         f"{max_context} tokens (prompt + new tokens must fit)")


def check_prompts(prompts: Any) -> None:
    """``LLM.generate``'s first argument: one prompt (str or token ids) or a list of prompts."""
    if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, (list, tuple)) or not prompts \
            or all(isinstance(t, numbers.Number) for t in prompts):     # one prompt (maybe as token ids)
        check_prompt(prompts)
        return
    if all(isinstance(p, (list, tuple)) for p in prompts) or all(isinstance(p, str) for p in prompts):
        for i, p in enumerate(prompts):
            check_prompt(p, f"prompts[{i}]")
        return
    kinds = sorted({type(p).__name__ for p in prompts})
    raise TypeError(f"prompts must be a str, a list of token ids, or a list of those; got a list of {kinds}")


def check_messages(messages: Any) -> list[list[dict[str, str]]]:
    """One conversation (list of {"role": str, "content": str}) or a list of them -> list of conversations."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"messages must be a non-empty list of {{'role', 'content'}} dicts (or a list of "
                        f"such lists), got {type(messages).__name__}")
    conversations = [messages] if isinstance(messages[0], dict) else messages
    for c, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise TypeError(f"conversation {c} must be a non-empty list of messages, got {type(conv).__name__}")
        for i, m in enumerate(conv):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be a {{'role': str, 'content': str}} dict, got {m!r:.80}")
    return [list(c) for c in conversations]


# --- engine arguments ---
def check_device(device: Any) -> None:
    """None (auto), "cpu", "cuda" or "cuda:N"; other torch device types (meta, mps, ...) are refused."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available() \
            and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees only {torch.cuda.device_count()} GPU(s)")


def check_engine_args(device: Any = None, *, seed: Any = 0, max_num_seqs: Any = 32,
                      max_num_batched_tokens: Any = 512, block_size: Any = 16,
                      kv_cache_memory_bytes: Any = 2**30, kv_cache_dtype: Any = "auto") -> None:
    """``LLM(...)``'s engine arguments, checked at construction rather than at generate time (or never)."""
    check_device(device)
    check_int(seed, "seed", lo=0, hi=SEED_MAX)
    for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size), ("kv_cache_memory_bytes", kv_cache_memory_bytes)):
        check_int(value, name, lo=1)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")


# --- memory ---
def available_memory(device: Any = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:    # Linux: what the kernel could hand out
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:                                            # other POSIX systems: free pages only
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class InsufficientMemoryError(ValueError, MemoryError):
    """A buffer the request or the model would need is larger than the memory left."""


def check_allocation(nbytes: float, what: str, device: Any = "cpu") -> None:
    """Refuse, before allocating, a buffer larger than the memory the device has left."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise InsufficientMemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB ({int(nbytes)} bytes) but only "
                          f"{free / 2**30:.2f} GiB is available on {device}; lower max_tokens / "
                          f"the context, the batch size, or use a smaller KV format")
