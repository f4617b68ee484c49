"""Serving metrics, with the definitions of vLLM's serving benchmark (``vllm/benchmarks/serve.py``,
``calculate_metrics``): TTFT, TPOT, ITL, E2E, throughputs, and goodput (DistServe, Zhong et al. 2024).
Percentiles are numpy's. The definitions, drawn: docs/serving.md.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from minfer.metrics import RequestStats, tpot_from_timestamps  # noqa: F401  (the lessons' reference)

SLO_METRICS = ("ttft", "tpot", "e2el")     # names accepted in ``slo_ms`` (as vLLM's --goodput)
PERCENTILES = (50, 90, 95, 99)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between order statistics: ``np.percentile``'s
    default, as vLLM's benchmark reports it and as lesson 05 grades a learner's version."""
    if len(values) == 0:
        raise ValueError("percentile of an empty list")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile p must be in [0, 100], got {p}")
    return float(np.percentile(values, p))


@dataclass
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float                  # population standard deviation (numpy's default), as vLLM
    p90: float
    p95: float
    p99: float
    count: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Distribution":
        if not seconds:
            return cls(*[math.nan] * 6, 0)
        ms = 1000.0 * np.asarray(seconds, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(ms, PERCENTILES).tolist()
        return cls(float(ms.mean()), p50, float(ms.std()), p90, p95, p99, len(ms))


@dataclass
class ServingMetrics:
    """What ``summarize`` returns: throughputs and latency distributions of one run."""

    completed: int
    duration: float                     # seconds
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float           # req/s
    output_throughput: float            # output tok/s
    total_token_throughput: float       # (prompt + output) tok/s
    ttft: Distribution                  # ms
    tpot: Distribution                  # ms
    itl: Distribution                   # ms
    e2el: Distribution                  # ms
    queueing: Distribution              # ms
    slo_ms: dict[str, float] = field(default_factory=dict)
    good_requests: int | None = None    # requests that met every SLO (None: no SLO given)
    goodput: float | None = None        # good_requests / duration (req/s)
    num_preemptions: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def stats_from_events(events: Iterable[tuple[float, str, str]]) -> dict[str, RequestStats]:
    """One ``RequestStats`` per request from an event log of (time, request_id, kind), kind one of
    ``arrival``, ``scheduled``, ``token``, ``finished`` (a later ``scheduled`` is a re-admission)."""
    stats: dict[str, RequestStats] = {}
    for t, rid, kind in sorted(events, key=lambda e: e[0]):
        if kind == "arrival":
            stats[rid] = RequestStats(arrival_time=t)
        elif kind == "scheduled" and stats[rid].first_scheduled_time is None:
            stats[rid].first_scheduled_time = t
        elif kind == "token":
            stats[rid].record_token(t)
        elif kind == "finished":
            stats[rid].finish_time = t
    return stats


def meets_slos(r: RequestStats, slo_ms: dict[str, float]) -> bool:
    """True if the request met every SLO. TPOT of a one-token request counts as 0 (vLLM)."""
    values = {"ttft": r.ttft, "tpot": r.tpot if r.tpot is not None else 0.0, "e2el": r.e2el}
    return all(values[k] is not None and 1000.0 * values[k] <= v for k, v in slo_ms.items())


def summarize(requests: Iterable[RequestStats], duration: float | None = None,
              slo_ms: dict[str, float] | None = None) -> ServingMetrics:
    """Metrics of the finished requests of a run. ``duration``: seconds (default: last finish - first
    arrival); ``slo_ms``: e.g. ``{"ttft": 500, "tpot": 50}`` (milliseconds) enables goodput."""
    slo_ms = dict(slo_ms or {})
    for k, v in slo_ms.items():
        if k not in SLO_METRICS:
            raise ValueError(f"unknown SLO metric {k!r}; choose from {SLO_METRICS}")
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"SLO {k} must be a positive number of milliseconds, got {v!r}")
    done = [r for r in requests if r.finish_time is not None]
    if duration is None:
        duration = (max(r.finish_time for r in done) - min(r.arrival_time for r in done)) if done else 0.0
    if done and not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: float("nan"))
    total_in = sum(r.num_prompt_tokens for r in done)
    total_out = sum(r.num_output_tokens for r in done)
    good = sum(meets_slos(r, slo_ms) for r in done) if slo_ms else None
    return ServingMetrics(
        completed=len(done), duration=duration,
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=per_s(len(done)), output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        ttft=Distribution.of([r.ttft for r in done if r.ttft is not None]),
        tpot=Distribution.of([r.tpot for r in done if r.tpot is not None]),
        itl=Distribution.of([g for r in done for g in r.itls]),
        e2el=Distribution.of([r.e2el for r in done]),
        queueing=Distribution.of([r.queueing_time for r in done if r.queueing_time is not None]),
        slo_ms=slo_ms, good_requests=good, goodput=None if good is None else per_s(good),
        num_preemptions=sum(r.num_preemptions for r in done),
    )


def format_table(results: dict[str, ServingMetrics]) -> str:
    """A side-by-side table, one column per run (e.g. per policy)."""
    from operator import attrgetter
    names, runs = list(results), list(results.values())
    spec = [("completed requests", "completed", "{:d}"), ("duration (s)", "duration", "{:.2f}"),
            ("input tokens", "total_input_tokens", "{:d}"), ("output tokens", "total_output_tokens", "{:d}"),
            ("request throughput (req/s)", "request_throughput", "{:.3f}"),
            ("output throughput (tok/s)", "output_throughput", "{:.2f}"),
            ("total throughput (tok/s)", "total_token_throughput", "{:.2f}")]
    if any(m.goodput is not None for m in runs):
        slo = " & ".join(f"{k}<={v:g}ms" for k, v in next(m.slo_ms for m in runs if m.slo_ms).items())
        spec += [(f"goodput (req/s, {slo})", "goodput", "{:.3f}"),
                 ("requests meeting all SLOs", "good_requests", "{:d}")]
    spec += [("preemptions", "num_preemptions", "{:d}")]
    spec += [(f"{stat} {name} (ms)", f"{metric}.{stat}", "{:.1f}")
             for metric, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"),
                                  ("queueing", "queueing")) for stat in ("mean", "median", "p90", "p99")]
    rows = [(label, [_cell(attrgetter(attr)(m), fmt) for m in runs]) for label, attr, fmt in spec]
    w0 = max(len(label) for label, _ in rows)
    widths = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    head = " " * w0 + " | " + " | ".join(n.rjust(w) for n, w in zip(names, widths))
    lines = [head, "-" * len(head)]
    lines += [label.ljust(w0) + " | " + " | ".join(v.rjust(w) for v, w in zip(vals, widths))
              for label, vals in rows]
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
