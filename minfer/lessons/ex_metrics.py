"""Exercises of lesson 05 on request events (TTFT, goodput as in vLLM's --goodput), and static batching.

An event log is ((time, request_id, kind), ...) in time order, kind in arrival, scheduled, token, finished.
"""
import math
from typing import Any, Optional

from hypothesis import strategies as st

from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.lessons.ex_serving import continuous_step
from minfer.lessons.registry import Exercise, Inputs, against_definition, number_problem, register, returned


@st.composite
def _events(draw) -> tuple:
    """1 to 4 requests: arrival, then (unless still queued) scheduled, 1 to 4 tokens, finished."""
    events = []
    for i in range(draw(st.integers(1, 4))):
        t = float(draw(st.integers(0, 20)))
        events.append((t, f"r{i}", "arrival"))
        n = draw(st.integers(0, 4))
        t += draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
        events += [(t, f"r{i}", "scheduled")] if n else []
        for _ in range(n):
            t += draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
            events.append((t, f"r{i}", "token"))
        events += [(t, f"r{i}", "finished")] if n else []
    events.sort(key=lambda e: e[0])          # then strictly increasing times: the log's order is time's
    return tuple((t + k * 1e-3, rid, kind) for k, (t, rid, kind) in enumerate(events))


def _own(events: tuple) -> dict[str, dict]:
    """arrival, token times and finish of each request, read directly."""
    req: dict[str, dict] = {}
    for t, rid, kind in events:
        r = req.setdefault(rid, {"token": [], "finished": None})
        if kind == "token":
            r["token"].append(t)
        else:
            r[kind] = t                                  # arrival, scheduled, finished
    return req


def ttft_from_events(events):
    """The reference: ``RequestStats.ttft`` of every request that has a first token."""
    from minfer.serving.metrics import stats_from_events

    return {rid: s.ttft for rid, s in stats_from_events(events).items() if s.ttft is not None}


def _validate_ttft(inputs: Inputs, actual: Any) -> Optional[str]:
    if not isinstance(actual, dict):
        return returned(actual, "a dict {request_id: seconds}")
    want = {rid: r["token"][0] - r["arrival"] for rid, r in _own(inputs["events"]).items() if r["token"]}
    if set(actual) != set(want):
        return (f"requests {sorted(actual)}, expected {sorted(want)}: every request with at least one "
                f"token, and only those")
    for rid, w in want.items():
        if not isinstance(actual[rid], (int, float)) or not math.isclose(actual[rid], w, abs_tol=1e-9):
            return (f"{rid}: TTFT = its first token's time - its arrival time = {w!r}, yours {actual[rid]!r} "
                    f"(queueing counts: the clock starts at arrival, not when it is scheduled)")
    return None


register(Exercise(
    name="serving.ttft",
    lesson="05_batching_and_metrics", function="ttft",
    description="ttft(events) -> {request_id: first token time - arrival time} for requests with a token",
    reference="minfer.lessons.ex_metrics:ttft_from_events",
    inputs=st.builds(lambda e: {"events": e}, _events()),
    compare=against_definition(_validate_ttft),
))


def goodput_from_events(events, slo_ms, duration):
    """The reference: ``summarize``'s goodput over the finished requests."""
    from minfer.serving.metrics import stats_from_events, summarize

    return summarize(stats_from_events(events).values(), duration, dict(slo_ms)).goodput


@st.composite
def _goodput_inputs(draw) -> Inputs:
    keys = draw(st.lists(st.sampled_from(["ttft", "tpot", "e2el"]), min_size=1, max_size=3, unique=True))
    slo = {k: float(draw(st.sampled_from([250, 500, 1000, 2000, 4000]))) for k in keys}
    return {"events": draw(_events()), "slo_ms": slo, "duration": float(draw(st.integers(1, 60)))}


def _validate_goodput(inputs: Inputs, actual: Any) -> Optional[str]:
    good = []
    for rid, r in sorted(_own(inputs["events"]).items()):
        if r["finished"] is None:
            continue
        n = len(r["token"])
        ms = {"ttft": 1000 * (r["token"][0] - r["arrival"]), "e2el": 1000 * (r["finished"] - r["arrival"]),
              "tpot": 1000 * (r["finished"] - r["token"][0]) / (n - 1) if n > 1 else 0.0}
        if all(ms[k] <= limit for k, limit in inputs["slo_ms"].items()):
            good.append(rid)
    want = len(good) / inputs["duration"]
    return number_problem(actual, want, "requests per second",
                          f"finished requests meeting every SLO {inputs['slo_ms']} (ms; a one-token "
                          f"request has TPOT 0): {good}, over {inputs['duration']} s = {want!r} req/s; "
                          f"yours is {actual!r}")


register(Exercise(
    name="serving.goodput",
    lesson="05_batching_and_metrics", function="goodput",
    description=("goodput(events, slo_ms, duration) -> finished requests meeting every SLO (ttft, tpot, "
                 "e2el in ms) per second"),
    reference="minfer.lessons.ex_metrics:goodput_from_events",
    inputs=_goodput_inputs(),
    compare=against_definition(_validate_goodput),
))


def schedule_once(kv, policy: str, running, waiting, token_budget: int, max_num_seqs: int,
                  no_more_requests: bool = False):
    """One ``Scheduler.schedule`` of the engine (``policy``) over ``kv``: running requests are
    (id, num_tokens, num_computed_tokens, slots of KV held), waiting ones (id, num_tokens)."""
    from minfer.engine.request import Request, RequestStatus
    from minfer.engine.scheduler import Scheduler, SchedulerConfig
    from minfer.sampling import SamplingParams

    sched = Scheduler(SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=token_budget), kv, clock=lambda: 0.0)
    sched.no_more_requests = no_more_requests
    params = SamplingParams(temperature=0.0)
    for rid, num_tokens, computed, slots in running:
        req = Request(rid, [1] * num_tokens, params, arrival_time=0.0)
        kv.allocate(rid, [1] * slots)
        req.num_computed_tokens, req.status = computed, RequestStatus.RUNNING
        sched.running.append(req)
    for rid, num_tokens in waiting:
        sched.add_request(Request(rid, [1] * num_tokens, params, arrival_time=0.0))
    return sched.schedule()


def static_step_reference(running, waiting, token_budget, max_num_seqs, no_more_requests):
    """The engine's ``Scheduler.schedule`` with ``policy="static"`` and memory to spare."""
    kv = KVCacheManager(BlockPool(4096, 1, enable_prefix_caching=False))
    out = schedule_once(kv, "static", [(*r, r[1]) for r in running], waiting, token_budget, max_num_seqs,
                        no_more_requests)
    return [(c.request.request_id, c.num_tokens) for c in out.chunks]


@st.composite
def _static_inputs(draw) -> Inputs:
    running = []
    if draw(st.booleans()):                       # a batch in progress, or none
        for i in range(draw(st.integers(1, 4))):
            num_tokens = draw(st.integers(1, 20))
            running.append((f"r{i}", num_tokens, draw(st.integers(0, num_tokens - 1))))
    waiting = [(f"w{i}", draw(st.integers(1, 20))) for i in range(draw(st.integers(0, 5)))]
    return {"running": tuple(running), "waiting": tuple(waiting), "token_budget": draw(st.integers(1, 40)),
            "max_num_seqs": draw(st.integers(1, 4)), "no_more_requests": draw(st.booleans())}


def _validate_static(inputs: Inputs, actual: Any) -> Optional[str]:
    try:
        got = [(rid, n) for rid, n in actual]
    except (TypeError, ValueError):
        return returned(actual, "a list of (request_id, num_tokens) pairs", show=True)
    batch, waiting, cap = inputs["running"], inputs["waiting"], inputs["max_num_seqs"]
    if not batch and waiting and (len(waiting) >= cap or inputs["no_more_requests"]):
        batch = [(rid, t, 0) for rid, t in waiting[:cap]]             # a new batch forms, all at once
    want = continuous_step(batch, (), inputs["token_budget"], cap)     # its members run; nobody joins
    if got == want:
        return None
    return (f"expected {want}, yours {got}: a batch starts only when none runs and {cap} requests wait "
            f"(or no more will come), and nobody joins a running batch")


register(Exercise(
    name="serving.static_step",
    lesson="05_batching_and_metrics", function="static_step",
    description=("static_step(running, waiting, token_budget, max_num_seqs, no_more_requests) -> "
                 "[(request_id, n), ...]: a new batch only when none runs; nobody joins a running batch"),
    reference="minfer.lessons.ex_metrics:static_step_reference",
    inputs=_static_inputs(),
    compare=against_definition(_validate_static),
))
