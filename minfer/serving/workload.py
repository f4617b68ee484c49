"""Workloads: seeded request traces for the serving benchmark, the lessons and the tests.
``synthetic_trace`` (random ids) and ``text_trace`` (``pydoc_data.topics``); arrivals are gamma gaps of mean
1/rate and shape ``burstiness``, as vLLM's ``vllm/benchmarks/serve.py`` (``get_request``; docs/serving.md).
"""
import itertools
import math
import random

from minfer.engine.request import TraceRequest

INSTRUCTION = "Summarize the following Python documentation in a few sentences.\n\n"


def _check_range(name: str, lo_hi: tuple[int, int]) -> tuple[int, int]:
    lo, hi = lo_hi
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"{name} must be (lo, hi) integers with 1 <= lo <= hi, got {lo_hi!r}")
    return lo, hi


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n arrival times (s) from t = 0: cumulative gamma(shape=burstiness, scale=1/(rate*burstiness))
    gaps, of mean 1/rate whatever the burstiness."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf = all at once), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson), got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    gaps = [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n - 1)]
    return list(itertools.accumulate(gaps, initial=0.0))[:n]


def synthetic_trace(n: int, *, rate: float = math.inf, burstiness: float = 1.0,
                    prompt_len: tuple[int, int] = (16, 512), output_len: tuple[int, int] = (16, 256),
                    vocab: tuple[int, int] = (0, 100), seed: int = 0) -> list[TraceRequest]:
    """n requests with uniform random lengths and random token ids in [vocab[0], vocab[1])."""
    if not vocab[0] < vocab[1]:
        raise ValueError(f"vocab must be a non-empty id range (lo, hi), got {vocab!r}")
    return _trace(n, rate, burstiness, prompt_len, output_len, seed,
                  lambda rng, p: ([rng.randrange(vocab[0], vocab[1]) for _ in range(p)], None))


def _trace(n: int, rate: float, burstiness: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
           seed: int, make_prompt) -> list[TraceRequest]:
    """Arrival times, then per request a drawn prompt length p, ``make_prompt(rng, p)`` -> (ids, text or
    None), and a drawn output length."""
    plo, phi = _check_range("prompt_len", prompt_len)
    olo, ohi = _check_range("output_len", output_len)
    rng, out = random.Random(seed), []
    for i, t in enumerate(arrival_times(n, rate, burstiness, seed=seed + 1)):
        ids, text = make_prompt(rng, rng.randint(plo, phi))
        out.append(TraceRequest(f"req-{i}", t, ids, rng.randint(olo, ohi), prompt=text))
    return out


def python_docs() -> list[tuple[str, str]]:
    """(topic, text) pairs of the CPython documentation that ships with Python (sorted by topic)."""
    from pydoc_data.topics import topics
    return sorted((k, v) for k, v in topics.items() if len(v) > 200)


def text_trace(tokenizer, n: int, *, rate: float = math.inf, burstiness: float = 1.0,
               prompt_len: tuple[int, int] = (16, 512), output_len: tuple[int, int] = (16, 256),
               seed: int = 0) -> list[TraceRequest]:
    """n summarisation requests over Python's own docs, each prompt exactly its drawn length: the
    instruction + a documentation topic (continuing into the next ones), cut to that many tokens."""
    docs, head = python_docs(), tokenizer.encode(INSTRUCTION)

    def prompt(rng: random.Random, p: int) -> tuple[list[int], str]:
        body: list[int] = []
        j = rng.randrange(len(docs))                  # the first topic
        while len(head) + len(body) < p:              # enough documentation text
            body += tokenizer.encode(docs[j % len(docs)][1] + "\n\n")
            j += 1
        ids = (head + body)[:p]
        return ids, tokenizer.decode(ids)
    return _trace(n, rate, burstiness, prompt_len, output_len, seed, prompt)
