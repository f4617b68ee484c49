"""The router over two real ``minfer serve`` replica processes (tiny random model, 127.0.0.1).

The routers (one per policy) are served by uvicorn in threads of the test process, over real
HTTP: the same app ``minfer router`` runs, without three more Python processes to start.

Every policy must serve every request correctly (the oracle: ``LLM.generate``);
prefix-aware routing must find more prefix-cache hits than round robin on a
workload of 4 shared prefixes (counts from the replicas' /metrics, deterministic
because the requests go one at a time); a dead replica costs the requests routed
to it a 502/503, and the router keeps serving through the other.
"""
from __future__ import annotations

import signal

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
    routers = {p: ThreadServer(build_router_app(Router([r.url for r in replicas], p, tokenizer=tokenizer,
                                                       cooldown=60))) for p in POLICIES}
    for s in [*replicas, *routers.values()]:
        s.wait()
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


def test_prefix_aware_finds_more_cache_hits_than_round_robin(cluster):
    replicas, routers = cluster
    found = {}
    for policy, tag in (("round_robin", "A"), ("prefix_aware", "B")):
        before = hits(replicas)
        for prompt in _shared_prefix_workload(tag):
            assert complete(routers[policy].url, prompt, max_tokens=2).status_code == 200
        found[policy] = hits(replicas) - before
    # 16 requests, 4 prefixes of 5 full blocks: prefix_aware misses each prefix once (12 x 80 cached
    # tokens), round robin once per prefix and replica (8 x 80).
    assert found["prefix_aware"] == 12 * 80 and found["round_robin"] == 8 * 80, found


def test_a_dead_replica_gets_502_and_the_router_keeps_serving(cluster, llm):
    replicas, routers = cluster
    replicas[1].stop(signal.SIGKILL)
    url = routers["round_robin"].url
    codes = []
    for i in range(6):
        prompt = f"after the crash {i}"
        r = complete(url, prompt)
        codes.append(r.status_code)
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == llm.generate(prompt, SamplingParams(temperature=0,
                                                                                         max_tokens=8))[0].text
        else:
            assert r.status_code in (502, 503) and r.json()["error"]["code"] in ("bad_gateway", "no_replica")
    assert codes.count(502) == 1 and codes.count(200) == 5, codes   # the dead one is skipped after its 502
    assert httpx.get(f"{url}/health").status_code == 200
    assert 'minfer_router:replica_up{replica="%s"} 0.0' % replicas[1].url in httpx.get(f"{url}/metrics").text
