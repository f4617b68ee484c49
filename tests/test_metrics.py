"""Serving metrics: hand-computed values, numpy's percentiles, goodput's all-SLOs rule, the fake clock."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minfer.sampling import SamplingParams
from minfer.engine import LLMEngine, run_trace
from minfer.serving.fake import FakeClock, FakeRunner
from minfer.serving.metrics import RequestStats, meets_slos, percentile, summarize
from minfer.engine.scheduler import SchedulerConfig
from minfer.serving.workload import TraceRequest, arrival_times, synthetic_trace


def stats(arrival, tokens, scheduled=None, prompt=4):
    return RequestStats(arrival_time=arrival, num_prompt_tokens=prompt, first_scheduled_time=scheduled,
                        token_times=list(tokens), finish_time=tokens[-1] if tokens else None)


def test_one_request_by_hand():
    r = stats(1.0, [2.0, 2.5, 3.5], scheduled=1.5)
    assert r.queueing_time == 0.5
    assert r.ttft == 1.0
    assert r.e2el == 2.5
    assert r.tpot == pytest.approx((2.5 - 1.0) / 2)            # (E2E - TTFT) / (n - 1)
    assert r.itls == [0.5, 1.0]
    assert stats(0.0, [0.3]).tpot is None                        # one token: no TPOT


def test_summary_by_hand():
    reqs = [stats(0.0, [1.0, 1.1, 1.2, 1.3]),   # TTFT 1000 ms, TPOT 100 ms
            stats(0.5, [0.7, 1.7]),             # TTFT 200 ms,  TPOT 1000 ms
            stats(1.0, [1.4])]                  # TTFT 400 ms,  one token
    m = summarize(reqs, slo_ms={"ttft": 500, "tpot": 200})
    assert m.completed == 3 and m.duration == pytest.approx(1.7)
    assert m.total_input_tokens == 12 and m.total_output_tokens == 7
    assert m.request_throughput == pytest.approx(3 / 1.7)
    assert m.output_throughput == pytest.approx(7 / 1.7)
    assert m.total_token_throughput == pytest.approx(19 / 1.7)
    assert m.ttft.mean == pytest.approx((1000 + 200 + 400) / 3)
    assert m.ttft.median == pytest.approx(400)
    assert m.ttft.p99 == pytest.approx(400 + 0.98 * 600)          # rank 0.99 * 2 = 1.98
    assert m.tpot.count == 2 and m.tpot.mean == pytest.approx(550)
    assert m.itl.count == 4 and m.itl.mean == pytest.approx((100 * 3 + 1000) / 4)
    assert m.e2el.mean == pytest.approx((1300 + 1200 + 400) / 3)
    # Request 0 misses TTFT, request 1 misses TPOT, request 2 (TPOT counts as 0) meets both.
    assert m.good_requests == 1 and m.goodput == pytest.approx(1 / 1.7)
    assert summarize(reqs, slo_ms={"ttft": 1000}).good_requests == 3
    assert summarize(reqs).goodput is None


def test_bad_slo_names_the_field():
    with pytest.raises(ValueError, match="unknown SLO metric 'ttfb'"):
        summarize([stats(0, [1])], slo_ms={"ttfb": 100})
    with pytest.raises(ValueError, match="SLO tpot must be a positive"):
        summarize([stats(0, [1])], slo_ms={"tpot": -1})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40), st.floats(0, 100))
def test_percentile_matches_numpy(xs, p):
    assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-9, abs=1e-6)


request_times = st.tuples(st.floats(0, 10), st.lists(st.floats(0.001, 2), min_size=1, max_size=6)).map(
    lambda a: stats(a[0], np.cumsum([a[0]] + a[1])[1:].tolist()))


@settings(max_examples=200, deadline=None)
@given(st.lists(request_times, min_size=1, max_size=12), st.floats(1, 3000), st.floats(1, 3000),
       st.floats(1, 5000))
def test_goodput_counts_requests_meeting_every_slo(reqs, slo_ttft, slo_tpot, slo_e2el):
    slo = {"ttft": slo_ttft, "tpot": slo_tpot, "e2el": slo_e2el}
    m = summarize(reqs, slo_ms=slo)
    by_hand = sum(1 for r in reqs
                  if 1000 * r.ttft <= slo_ttft and 1000 * (r.tpot or 0.0) <= slo_tpot
                  and 1000 * r.e2el <= slo_e2el)
    assert m.good_requests == by_hand
    assert m.goodput == pytest.approx(by_hand / m.duration)
    for k in slo:                          # dropping an SLO never lowers goodput
        fewer = {kk: v for kk, v in slo.items() if kk != k}
        assert summarize(reqs, slo_ms=fewer).good_requests >= by_hand
    assert all(meets_slos(r, {}) for r in reqs)


def test_engine_timestamps_with_a_fake_clock():
    """Step cost 10 ms + 1 ms/token; two requests at t=0: every number follows by hand."""
    clock = FakeClock()
    runner = FakeRunner(64, 4, 16, clock=clock, step_fixed=0.010, step_per_token=0.001)
    eng = LLMEngine(runner, SchedulerConfig("continuous", max_num_batched_tokens=100), clock=clock)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    a = eng.requests[eng.add_request([1, 2, 3, 4], sp)]
    b = eng.requests[eng.add_request([5, 6], sp)]
    eng.run()
    # step 1: both prompts, N = 6 -> 16 ms; steps 2, 3: two decodes, N = 2 -> 12 ms each.
    for r in (a, b):
        assert r.stats.token_times == pytest.approx([0.016, 0.028, 0.040])
        assert r.stats.ttft == pytest.approx(0.016)
        assert r.stats.tpot == pytest.approx(0.012)
        assert r.stats.queueing_time == 0.0
    m = summarize([a.stats, b.stats])
    assert m.duration == pytest.approx(0.040)
    assert m.output_throughput == pytest.approx(6 / 0.040)
    assert m.tpot.p99 == pytest.approx(12.0)


def test_run_trace_counts_waiting_in_ttft():
    """A request arriving while a long step runs is stamped with its arrival time, not the step's end."""
    clock = FakeClock()
    runner = FakeRunner(64, 4, 16, clock=clock, step_fixed=0.0, step_per_token=0.010)
    eng = LLMEngine(runner, SchedulerConfig("continuous", max_num_batched_tokens=100), clock=clock)
    trace = [TraceRequest("a", 0.0, list(range(10)), 2), TraceRequest("b", 0.05, [1, 2], 2)]
    reqs, duration = run_trace(eng, trace, lambda r: SamplingParams(temperature=0, max_tokens=r.max_tokens,
                                                                    ignore_eos=True), sleep=clock.sleep)
    a, b = reqs
    # a's prefill (10 tokens) runs t = 0 .. 0.10; b arrived at 0.05 and joins the next step
    # (a's decode + b's 2 prompt tokens = 3 tokens -> 0.13).
    assert a.stats.ttft == pytest.approx(0.10)
    assert b.stats.arrival_time == pytest.approx(0.05)
    assert b.stats.queueing_time == pytest.approx(0.05)
    assert b.stats.ttft == pytest.approx(0.08)
    assert duration == pytest.approx(max(a.stats.finish_time, b.stats.finish_time))


def test_arrivals_are_seeded_with_the_right_mean():
    t = arrival_times(4000, rate=5.0, burstiness=1.0, seed=3)
    assert t == arrival_times(4000, rate=5.0, burstiness=1.0, seed=3)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 5.0, rel=0.1)              # exponential: std = mean
    bursty = np.diff(arrival_times(4000, rate=5.0, burstiness=0.25, seed=3))
    assert bursty.mean() == pytest.approx(0.2, rel=0.1) and bursty.std() > 1.5 * gaps.std()
    assert arrival_times(3, rate=math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate must be > 0"):
        arrival_times(3, rate=0)


def test_synthetic_trace_lengths_in_range():
    tr = synthetic_trace(50, rate=2.0, prompt_len=(16, 512), output_len=(16, 256), vocab=(10, 90), seed=1)
    assert all(16 <= len(r.prompt_token_ids) <= 512 and 16 <= r.max_tokens <= 256 for r in tr)
    assert all(10 <= t < 90 for r in tr for t in r.prompt_token_ids)
    assert tr == synthetic_trace(50, rate=2.0, prompt_len=(16, 512), output_len=(16, 256), vocab=(10, 90), seed=1)
    with pytest.raises(ValueError, match="prompt_len"):
        synthetic_trace(2, prompt_len=(10, 5))
