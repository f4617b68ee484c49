"""The router over two real ``minfer serve`` replica processes (tiny random model, 127.0.0.1).

The routers (one per policy) are served by uvicorn in threads of the test process, over real
HTTP: the same app ``minfer router`` runs, without three more Python processes to start.

Every policy must serve every request correctly (the oracle: ``LLM.generate``);
prefix-aware routing must find more prefix-cache hits than round robin on a
workload of 4 shared prefixes (counts from the replicas' /metrics, deterministic
because the requests go one at a time). Failures, with real processes: a replica
that hangs (SIGSTOP: it accepts connections and never answers) is found by the
health checks and its requests move to the other; a replica killed mid-stream
ends the stream with an error event and ``[DONE]``; a dead replica's requests are
retried on the other, so no client sees a 502 while one replica is up;
least_loaded splits 8 concurrent requests at worst 5/3.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minfer.sampling import SamplingParams
from minfer.serving.router import HashRing, Router, build_router_app, load_tokenizer, prefix_key, ring_lookup
from servers import ThreadServer, metric, serve, stop_all, tiny_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")   # the oracle runs in this process

POLICIES = ("round_robin", "least_loaded", "prefix_aware")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("rt") / "tiny")


@pytest.fixture(scope="module")
def llm(folder):
    from minfer.llm import LLM
    return LLM(str(folder))


@pytest.fixture(scope="module")
def cluster(folder, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    replicas = [serve(folder, log=logs / f"replica{i}.log") for i in range(2)]
    tokenizer = load_tokenizer(str(folder))         # the chat template and tokens prefix_aware hashes
    for s in replicas:                              # up before the routers' first health check
        s.wait()
    routers = {p: ThreadServer(build_router_app(Router([r.url for r in replicas], p, tokenizer=tokenizer,
                                                       cooldown=60), health_timeout=30)) for p in POLICIES}
    for s in routers.values():
        _wait_all_up(s.wait().url, replicas)
    yield replicas, routers
    for r in routers.values():
        r.stop()
    stop_all(replicas)


def complete(url, prompt, max_tokens=8, **kw):
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})


def hits(replicas):
    return sum(metric(r.url, "minfer:prefix_cache_hits_total") for r in replicas)


# ---------------------------------------------------------------- pure functions


@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20, unique=True),
       key=st.integers(0, 2**64 - 1))
def test_ring_lookup_is_the_first_point_at_or_after_the_key(points, key):
    points = sorted(points)
    owners = list(range(len(points)))
    after = [i for i, p in enumerate(points) if p >= key]
    assert ring_lookup(points, owners, key) == (after[0] if after else 0)


def test_consistent_hashing_moves_only_the_removed_replicas_keys():
    ring3, alive = HashRing(["a", "b", "c"]), [True, True, True]
    keys = [prefix_key(list(range(i, i + 64))) for i in range(300)]
    before = [ring3.lookup(k, alive) for k in keys]
    after = [ring3.lookup(k, [True, False, True]) for k in keys]
    assert all(a == b for a, b in zip(before, after) if a != 1)    # keys of a and c stay put
    assert {a for a in after} == {0, 2} and 40 < before.count(1) < 160   # b had about a third
    assert prefix_key([1] * 64 + [2]) == prefix_key([1] * 64 + [3])  # only the first blocks count
    assert prefix_key([1] * 64) != prefix_key([1] * 48 + [2] * 16)


def test_router_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--policy"):
        Router(["http://x"], "random")
    with pytest.raises(ValueError, match="--replica"):
        Router([], "round_robin")


# ---------------------------------------------------------------- live


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_serves_every_request(cluster, llm, policy):
    _, routers = cluster
    url = routers[policy].url
    for i, prompt in enumerate(["alpha beta", "gamma", "the same prefix, then", "the same prefix, now"]):
        want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].text
        r = complete(url, prompt, stream=bool(i % 2))
        assert r.status_code == 200, r.text
        if i % 2:
            lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            import json
            text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])
        else:
            text = r.json()["choices"][0]["text"]
        assert text == want
    msgs = [{"role": "user", "content": "hello there"}]
    want = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=8))[0].text
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "temperature": 0},
                   timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == want
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "temperature": 9}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"   # replica errors pass through
    assert "minfer_router:requests_total" in httpx.get(f"{url}/metrics").text


def _shared_prefix_workload(tag: str) -> list[str]:
    """4 distinct 80-token prefixes (byte tokenizer: 1 character = 1 token), each asked 4 times,
    in the order p0 p0 p1 p1 p2 p2 p3 p3 p0 p0 ...: round robin splits every prefix over both replicas."""
    prefixes = [(f"[{tag}{k}] shared document number {k}: " * 4)[:80] for k in range(4)]
    return [prefixes[k] + f" question {r}{j}?" for r in range(2) for k in range(4) for j in range(2)]


def _wait_all_up(url: str, replicas, timeout: float = 60.0) -> None:
    """Until the router at ``url`` counts every replica up (its health loop marks them)."""
    deadline = time.monotonic() + timeout
    while not all(httpx.get(f"{url}/health", timeout=10).json()["replicas"][r.url] for r in replicas):
        assert time.monotonic() < deadline, f"the router at {url} does not see every replica up"
        time.sleep(0.2)


def test_prefix_aware_finds_more_cache_hits_than_round_robin(cluster):
    replicas, routers = cluster
    found = {}
    for policy, tag in (("round_robin", "A"), ("prefix_aware", "B")):
        _wait_all_up(routers[policy].url, replicas)     # a replica down would skew both counts
        before = hits(replicas)
        for prompt in _shared_prefix_workload(tag):
            assert complete(routers[policy].url, prompt, max_tokens=2).status_code == 200
        found[policy] = hits(replicas) - before
    # 16 requests, 4 prefixes of 5 full blocks: prefix_aware misses each prefix once (12 x 80 cached
    # tokens), round robin once per prefix and replica (8 x 80).
    assert found["prefix_aware"] == 12 * 80 and found["round_robin"] == 8 * 80, found


def _router(replicas, policy="round_robin", **kw):
    return ThreadServer(build_router_app(Router([r.url for r in replicas], policy, cooldown=60), **kw)).wait()


def _per_replica(url) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("minfer_router:requests_total{"):
            replica = line.split('replica="')[1].split('"')[0]
            out[replica] = out.get(replica, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_least_loaded_counts_a_request_when_it_chooses(cluster):
    replicas, _ = cluster
    router = _router(replicas, "least_loaded", health_interval=0)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=router.url, timeout=60) as h:
                body = {"prompt": "split me", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
                return await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(8)))

        assert all(r.status_code == 200 for r in asyncio.run(main()))
        counts = sorted(_per_replica(router.url).values())
        assert sum(counts) == 8 and counts[0] >= 3, counts      # 4/4 or 5/3, never 8/0
    finally:
        router.stop()


def test_a_hung_replica_is_marked_down_and_back_up(cluster, llm):
    """SIGSTOP: the kernel still accepts its connections, nothing answers. The health checks mark
    it down within a second, requests waiting on it move to the other replica, and after SIGCONT
    a passing check puts it back."""
    replicas, _ = cluster
    router = _router(replicas, health_interval=0.3, health_timeout=0.5)
    replicas[0].proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()

        async def main():
            async with httpx.AsyncClient(base_url=router.url, timeout=30) as h:
                return await asyncio.gather(*(h.post("/v1/completions", json={
                    "prompt": f"hung {i}", "max_tokens": 8, "temperature": 0}) for i in range(4)))

        rs = asyncio.run(main())
        for i, r in enumerate(rs):
            assert r.status_code == 200, r.text
            want = llm.generate(f"hung {i}", SamplingParams(temperature=0, max_tokens=8))[0].text
            assert r.json()["choices"][0]["text"] == want
        assert time.monotonic() - t0 < 15
        assert httpx.get(f"{router.url}/v1/models", timeout=10).status_code == 200
        assert httpx.get(f"{router.url}/health").json()["replicas"][replicas[0].url] is False
    finally:
        replicas[0].proc.send_signal(signal.SIGCONT)
    try:
        deadline = time.monotonic() + 20
        while not httpx.get(f"{router.url}/health").json()["replicas"][replicas[0].url]:
            assert time.monotonic() < deadline, "the replica was not marked up again"
            time.sleep(0.2)
    finally:
        router.stop()


def _sse_lines(r) -> list[str]:
    return [x for x in r.iter_lines() if x]


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_and_done(cluster, llm):
    replicas, _ = cluster
    alone = _router(replicas[1:], health_interval=0)
    body = {"prompt": "a long one", "max_tokens": 240, "ignore_eos": True, "temperature": 0, "stream": True, "n": 4}
    try:
        with httpx.stream("POST", f"{alone.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x)
            replicas[1].stop(signal.SIGKILL)
            rest = [x for x in lines if x]
        events = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
        finished = [e for e in events if "choices" in e and e["choices"][0]["finish_reason"]]
        assert len(finished) < 4, "the stream ended before the kill: nothing was tested"
        assert rest[-1] == "data: [DONE]" and events[-1]["error"]["code"] == "bad_gateway", rest[-3:]
    finally:
        alone.stop()
    # the dead replica: each request goes to the other one (retried before any byte was sent)
    both = _router(replicas, health_interval=0)
    try:
        for i in range(6):
            r = complete(both.url, f"after the crash {i}")
            assert r.status_code == 200, r.text
            want = llm.generate(f"after the crash {i}", SamplingParams(temperature=0, max_tokens=8))[0].text
            assert r.json()["choices"][0]["text"] == want
        assert 'minfer_router:replica_up{replica="%s"} 0.0' % replicas[1].url in httpx.get(f"{both.url}/metrics").text
    finally:
        both.stop()


def test_with_every_replica_dead_the_router_answers_503(cluster):
    replicas, routers = cluster
    replicas[1].stop(signal.SIGKILL)                # already dead after the test above, if it ran
    router = _router(replicas[1:], health_interval=0)
    try:
        r = complete(router.url, "nobody home")
        assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway", r.text
        r = complete(router.url, "nobody home")     # in cooldown: not even tried
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
        assert httpx.get(f"{routers['round_robin'].url}/health").status_code == 200   # replica 0 is up
    finally:
        router.stop()


def test_router_honours_the_body_limit(cluster):
    replicas, _ = cluster
    router = _router(replicas, max_body_bytes=5000, health_interval=0)
    try:
        r = httpx.post(f"{router.url}/v1/completions", content=json.dumps({"prompt": "x" * 6000}), timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        for body in (b"[" * 2400 + b"]" * 2400, b'{"prompt": ' + b"9" * 4500 + b"}"):
            r = httpx.post(f"{router.url}/v1/completions", content=body, timeout=10)
            assert r.status_code == 400, r.text
    finally:
        router.stop()


@pytest.mark.slow
def test_serve_replicas_restarts_a_dead_child_and_children_die_with_the_supervisor(folder, tmp_path):
    """``minfer serve --replicas 2``: a replica killed with SIGKILL is started again on its port; the
    router refuses a body over --max-body-bytes; SIGKILL of the supervisor takes both replicas with it."""
    import os
    import re

    from servers import Server
    log = tmp_path / "sup.log"
    sup = Server("serve", str(folder), "--replicas", "2", "--threads", "1", "--max-body-bytes", "5000",
                 "--health-interval", "0.5", "--health-timeout", "2", log=log)
    try:
        sup.wait(180)
        children = dict(re.findall(r"replica (http://127\.0\.0\.1:\d+) \(pid (\d+)\)", log.read_text()))
        assert len(children) == 2, log.read_text()
        url0, pid0 = next(iter(children.items()))
        os.kill(int(pid0), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:                                  # the supervisor starts it again on the same port
            pids = re.findall(rf"replica {re.escape(url0)} \(pid (\d+)\)", log.read_text())
            if len(pids) == 2:
                try:
                    if httpx.get(f"{url0}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        children[url0] = pids[-1]
        r = httpx.post(f"{sup.url}/v1/completions", content=json.dumps({"prompt": "x" * 6000}), timeout=10)
        assert r.status_code == 413, r.text
        assert complete(sup.url, "still here").status_code == 200
        sup.proc.kill()                              # SIGKILL: no handler runs in the supervisor
        sup.proc.wait()
        deadline = time.monotonic() + 10
        for pid in children.values():
            while True:
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    break
                assert time.monotonic() < deadline, f"replica pid {pid} outlived the supervisor"
                time.sleep(0.1)
    finally:
        sup.stop()
