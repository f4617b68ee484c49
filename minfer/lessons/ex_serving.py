"""Exercises of lesson 05 (batching and serving metrics): TPOT, percentiles, one continuous-batching step.

References: ``minfer/serving/metrics.py`` and ``continuous_step`` below (``tests/test_scheduler.py``
checks that the engine's scheduler makes its decisions when memory is plentiful). Inputs are tuples.
"""
import math
from typing import Any, Optional

import numpy as np
from hypothesis import strategies as st

from minfer.lessons.registry import Exercise, Inputs, against_definition, number_problem, register, returned


@st.composite
def _tpot_inputs(draw) -> Inputs:
    arrival = draw(st.floats(0.0, 100.0, allow_nan=False))
    first = arrival + draw(st.floats(0.0, 5.0, allow_nan=False))             # the TTFT
    gaps = draw(st.lists(st.floats(0.0, 2.0, allow_nan=False), max_size=8))
    times = [first]
    for g in gaps:
        times.append(times[-1] + g)
    return {"arrival_time": arrival, "token_times": tuple(times)}


def _tpot_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    """Against the mean gap between consecutive tokens (None for fewer than 2 tokens)."""
    t, a = inputs["token_times"], inputs["arrival_time"]
    n = len(t)
    if n < 2:
        if actual is None:
            return None
        return f"with {n} output token there is no time *between* tokens: return None, not {actual!r}"
    want = sum(y - x for x, y in zip(t, t[1:])) / (n - 1)
    if actual is None:
        return f"returned None, but {n} tokens have {n - 1} gaps: expected {want!r}"
    e2e, ttft = t[-1] - a, t[0] - a
    return number_problem(actual, want, "a number of seconds",
                          f"E2E = {t[-1]!r} - {a!r} = {e2e!r}, TTFT = {t[0]!r} - {a!r} = {ttft!r}, "
                          f"TPOT = (E2E - TTFT) / ({n} - 1) = {want!r}; yours is {actual!r}", abs_tol=1e-9)


register(Exercise(
    name="serving.tpot",
    lesson="05_batching_and_metrics", function="tpot",
    description=("tpot(arrival_time, token_times) -> (E2E - TTFT) / (n - 1) in seconds, "
                 "None when fewer than 2 tokens"),
    reference="minfer.serving.metrics:tpot_from_timestamps",
    inputs=_tpot_inputs(),
    compare=against_definition(_tpot_problem),
))


def _compare_percentile(inputs: Inputs, expected: float, actual: Any) -> Optional[str]:
    xs = sorted(inputs["values"])
    r = inputs["p"] / 100 * (len(xs) - 1)
    lo, hi = math.floor(r), math.ceil(r)
    return number_problem(actual, expected, "a number",
                          f"sorted values {xs}; rank = p/100 * (n - 1) = {r:.6g}, between x[{lo}] = "
                          f"{xs[lo]!r} and x[{hi}] = {xs[hi]!r}: expected {expected!r}, yours {actual!r}",
                          abs_tol=1e-9)


def _validate_percentile(inputs: Inputs, actual: Any) -> Optional[str]:
    """numpy's linear-interpolation percentile."""
    want = float(np.percentile(list(inputs["values"]), inputs["p"]))
    return None if math.isclose(actual, want, rel_tol=1e-9, abs_tol=1e-6) else \
        f"numpy.percentile gives {want!r}, yours is {actual!r}"


register(Exercise(
    name="serving.percentile",
    lesson="05_batching_and_metrics", function="percentile",
    description="percentile(values, p) -> the p-th percentile (0..100), linear interpolation like numpy",
    reference="minfer.serving.metrics:percentile",
    inputs=st.builds(dict, values=st.lists(st.floats(0.0, 1000.0, allow_nan=False), min_size=1,
                                           max_size=12).map(tuple),
                     p=st.sampled_from([0, 50, 90, 95, 99, 100]) | st.floats(0.0, 100.0, allow_nan=False)),
    compare=_compare_percentile,
    validate=_validate_percentile,
))


def continuous_step(running: list[tuple[str, int, int]], waiting: list[tuple[str, int]],
                    token_budget: int, max_num_seqs: int) -> list[tuple[str, int]]:
    """One continuous-batching step, memory aside: [(request_id, num_scheduled_tokens), ...].

    running [(id, num_tokens, num_computed_tokens)] oldest first get their remaining tokens (1 for a
    decode) as far as the budget goes; then waiting [(id, num_tokens)] join in order while budget and
    ``max_num_seqs`` allow, the last one perhaps with only a chunk of its prompt. ``Scheduler.schedule``
    (minfer/engine/scheduler.py) is this loop plus KV blocks and preemption."""
    out, budget = [], token_budget
    for request_id, num_tokens, num_computed in running:
        if budget == 0:
            break
        n = min(num_tokens - num_computed, budget)
        out.append((request_id, n))
        budget -= n
    num_seqs = len(running)
    for request_id, num_tokens in waiting:
        if budget == 0 or num_seqs >= max_num_seqs:
            break
        n = min(num_tokens, budget)
        out.append((request_id, n))
        budget -= n
        num_seqs += 1
    return out


@st.composite
def _step_inputs(draw) -> Inputs:
    n_run = draw(st.integers(0, 5))
    running = []
    for i in range(n_run):
        num_tokens = draw(st.integers(1, 30))
        computed = draw(st.integers(0, num_tokens - 1))      # a running request has >= 1 token to compute
        running.append((f"r{i}", num_tokens, computed))
    waiting = [(f"w{i}", draw(st.integers(1, 30))) for i in range(draw(st.integers(0, 5)))]
    return {"running": tuple(running), "waiting": tuple(waiting),
            "token_budget": draw(st.integers(1, 40)), "max_num_seqs": draw(st.integers(1, 8))}


def _compare_step(inputs: Inputs, expected: list, actual: Any) -> Optional[str]:
    try:
        got = [(rid, n) for rid, n in actual]
    except (TypeError, ValueError):
        return returned(actual, "a list of (request_id, num_tokens) pairs", show=True)
    if got == [tuple(x) for x in expected]:
        return None
    for k, (e, a) in enumerate(zip(expected, got)):
        if tuple(e) != a:
            return (f"entry {k}: expected {tuple(e)}, yours {a} "
                    f"(running requests first in order, then waiting ones while budget and seats last)")
    return f"expected {len(expected)} entries {expected}, yours has {len(got)}: {got}"


def _validate_step(inputs: Inputs, actual: Any) -> Optional[str]:
    """Invariants of any valid step: budget respected, no request over-scheduled, seats respected."""
    got = [(rid, n) for rid, n in actual]
    if sum(n for _, n in got) > inputs["token_budget"]:
        return f"scheduled {sum(n for _, n in got)} tokens, more than the budget {inputs['token_budget']}"
    remaining = {rid: t - c for rid, t, c in inputs["running"]} | {rid: t for rid, t in inputs["waiting"]}
    for rid, n in got:
        if not 1 <= n <= remaining.get(rid, 0):
            return f"{rid} got {n} tokens but has {remaining.get(rid, 0)} left to compute"
    admitted = sum(1 for rid, _ in got if rid.startswith("w"))
    if len(inputs["running"]) + admitted > max(inputs["max_num_seqs"], len(inputs["running"])):
        return f"{admitted} requests admitted: more than max_num_seqs = {inputs['max_num_seqs']} would run"
    return None


register(Exercise(
    name="serving.continuous_step",
    lesson="05_batching_and_metrics", function="continuous_step",
    description=("continuous_step(running, waiting, token_budget, max_num_seqs) -> [(request_id, n), ...]: "
                 "running requests first, then admit waiting ones, chunking the last prompt"),
    reference="minfer.lessons.ex_serving:continuous_step",
    inputs=_step_inputs(),
    compare=_compare_step,
    validate=_validate_step,
))
