"""``minfer router --replica URL ... --policy round_robin|least_loaded|prefix_aware``.

A router sits in front of several engine replicas and picks one per request:

* ``round_robin``  replica 0, 1, ..., N-1, 0, ...: even counts, blind to the cache.
* ``least_loaded`` the replica with the fewest requests in flight through this router.
* ``prefix_aware`` hash the first blocks of the prompt (token ids after the chat template,
  the same chained block hashes as the prefix cache, ``minfer.kv.block_pool.block_hashes``)
  onto a consistent-hash ring: requests that share a system prompt or a document land
  on the replica whose prefix cache already holds it, and adding or removing a
  replica moves only the keys of its own arcs (Karger et al. 1997).

        ring (2**64 points)   0 ──●A──────●B────●A────●B──────── 2**64
        key = hash(first blocks)          ^ key -> the first point at or after it: B

The router forwards request bodies and response bytes unchanged (streams too),
so a client cannot tell it from a server. A replica that cannot be reached
gets a 502 for that request and is skipped for ``--cooldown`` seconds; with
none left the router answers 503. It has its own ``/metrics``. The same idea
in production: SGLang's router (cache-aware routing), llm-d / the Gateway API
inference extension (prefix-cache-aware scoring).
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import Request

from minfer.serving.http_common import add_server_args, decode_json, install_error_handlers, read_body
from minfer.serving.openai_api import APIError

POLICIES = ("round_robin", "least_loaded", "prefix_aware")


# ---------------------------------------------------------------------------
# Consistent hashing
# ---------------------------------------------------------------------------


def stable_hash(data: bytes | str) -> int:
    """A 64-bit hash that is the same in every process (Python's str hash is salted)."""
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def ring_lookup(points: Sequence[int], owners: Sequence[int], key: int) -> int:
    """The owner of the first ring point at or after ``key``, wrapping past the end to the first.

    ``points`` are sorted ascending; ``owners[i]`` owns ``points[i]``.
    """
    i = bisect.bisect_left(points, key)
    return owners[i % len(points)]


class HashRing:
    """Each replica owns ``vnodes`` points on the ring (virtual nodes even out the arcs)."""

    def __init__(self, replicas: Sequence[str], vnodes: int = 64):
        pts = sorted((stable_hash(f"{r}#{v}"), i) for i, r in enumerate(replicas) for v in range(vnodes))
        self.points, self.owners = [p for p, _ in pts], [o for _, o in pts]

    def lookup(self, key: int, alive: Sequence[bool]) -> int | None:
        """The key's replica, or the next one along the ring that is alive (None: all dead)."""
        i = bisect.bisect_left(self.points, key)
        for k in range(len(self.points)):
            owner = self.owners[(i + k) % len(self.points)]
            if alive[owner]:
                return owner
        return None


def prefix_key(token_ids: Sequence[int], block_size: int = 16, num_blocks: int = 4) -> int:
    """Routing key: the chained hash of the first ``num_blocks`` full blocks (all tokens if shorter)."""
    from minfer.kv.block_pool import block_hashes
    head = list(token_ids[:block_size * num_blocks])
    hashes = block_hashes(head, block_size)
    return stable_hash(str(hashes[-1] if hashes else tuple(head)))


# ---------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------


class Router:
    """Picks a replica per request and keeps their health and load."""

    def __init__(self, replicas: Sequence[str], policy: str = "round_robin", *, tokenizer=None,
                 block_size: int = 16, prefix_blocks: int = 4, cooldown: float = 5.0):
        if policy not in POLICIES:
            raise ValueError(f"--policy must be one of {POLICIES}, got {policy!r}")
        if not replicas:
            raise ValueError("give at least one --replica URL")
        self.replicas = [r.rstrip("/") for r in replicas]
        self.policy, self.tokenizer = policy, tokenizer
        self.block_size, self.prefix_blocks, self.cooldown = block_size, prefix_blocks, cooldown
        self.ring = HashRing(self.replicas)
        self.in_flight = [0] * len(self.replicas)
        self.down_until = [0.0] * len(self.replicas)
        self._next = 0

    def alive(self) -> list[bool]:
        now = time.monotonic()
        return [now >= t for t in self.down_until]

    def mark_down(self, i: int) -> None:
        self.down_until[i] = time.monotonic() + self.cooldown

    def prompt_ids(self, path: str, body: dict) -> list[int]:
        """The prompt's token ids as the engine will see them (chat template applied)."""
        if self.tokenizer is None:          # no tokenizer: the characters stand in for tokens
            text = body.get("prompt") if "completions" in path and "chat" not in path else \
                "".join(f"{m.get('role')}:{m.get('content')}\n" for m in body.get("messages") or []
                        if isinstance(m, dict))
            return [ord(c) for c in str(text)]
        if "chat" in path:
            msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                     "".join(p.get("text", "") for p in m["content"])} for m in body["messages"]]
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        prompt = body["prompt"]
        prompt = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def choose(self, path: str, body: dict) -> int | None:
        """The replica for this request (None: every replica is down)."""
        alive = self.alive()
        if not any(alive):
            return None
        n = len(self.replicas)
        if self.policy == "round_robin":
            for _ in range(n):
                i, self._next = self._next, (self._next + 1) % n
                if alive[i]:
                    return i
        if self.policy == "least_loaded":
            return min((i for i in range(n) if alive[i]), key=lambda i: (self.in_flight[i], i))
        try:
            ids = self.prompt_ids(path, body)
        except Exception:                   # a malformed body: any replica will answer the 400
            ids = []
        return self.ring.lookup(prefix_key(ids, self.block_size, self.prefix_blocks), alive)


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


def build_router_app(router: Router, *, connect_timeout: float = 2.0):
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    reg = CollectorRegistry()
    m_requests = Counter("minfer_router:requests", "requests forwarded", ["replica", "status"], registry=reg)
    m_in_flight = Gauge("minfer_router:in_flight", "requests in flight", ["replica"], registry=reg)
    m_up = Gauge("minfer_router:replica_up", "1 if the replica is not in cooldown", ["replica"], registry=reg)
    m_latency = Histogram("minfer_router:request_latency_seconds", "router in -> last byte out",
                          ["replica"], registry=reg)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=connect_timeout),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    app = FastAPI(title="minfer router", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        if not any(router.alive()):
            raise APIError(503, "no replica is up", code="no_replica")
        return {"status": "ok", "replicas": dict(zip(router.replicas, router.alive()))}

    @app.get("/metrics")
    async def metrics():
        for r, up in zip(router.replicas, router.alive()):
            m_up.labels(r).set(int(up))
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        for i, up in enumerate(router.alive()):
            if up:
                try:
                    r = await client.get(f"{router.replicas[i]}/v1/models")
                    return Response(r.content, r.status_code, media_type="application/json")
                except httpx.TransportError:
                    router.mark_down(i)
        raise APIError(503, "no replica is up", code="no_replica")

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def forward(request: Request):
        raw = await read_body(request)
        body = decode_json(raw)
        path = request.url.path
        i = router.choose(path, body if isinstance(body, dict) else {})
        if i is None:
            raise APIError(503, "no replica is up; retry later", code="no_replica", headers={"Retry-After": "1"})
        url, t0 = router.replicas[i], time.perf_counter()
        try:
            upstream = await client.send(client.build_request(
                "POST", url + path, content=raw, headers={"content-type": "application/json"}), stream=True)
        except httpx.TransportError as e:
            router.mark_down(i)
            m_requests.labels(url, "502").inc()
            raise APIError(502, f"replica {url} is unreachable ({type(e).__name__}); it is skipped for "
                                f"{router.cooldown:g} s", code="bad_gateway") from None
        router.in_flight[i] += 1
        m_in_flight.labels(url).inc()
        m_requests.labels(url, str(upstream.status_code)).inc()
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("retry-after",)}

        async def relay():
            try:
                async for part in upstream.aiter_raw():
                    yield part
            finally:                             # also when our client disconnects: the replica aborts too
                await upstream.aclose()
                router.in_flight[i] -= 1
                m_in_flight.labels(url).dec()
                m_latency.labels(url).observe(time.perf_counter() - t0)

        return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers,
                                 media_type=upstream.headers.get("content-type"))

    return app


# ---------------------------------------------------------------------------
# Commands: `minfer router` and `minfer serve --replicas N`
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Route OpenAI API requests over engine replicas (minfer serve processes)."
    p.add_argument("--replica", action="append", required=True, help="replica base URL (repeat for each)")
    p.add_argument("--policy", default="round_robin", help=f"one of {', '.join(POLICIES)} (default round_robin)")
    p.add_argument("--model", default=None,
                   help="model whose tokenizer and chat template prefix_aware hashes (default: characters)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per hashed block (default 16)")
    p.add_argument("--prefix-blocks", type=int, default=4, help="blocks of the prompt that make the key (default 4)")
    p.add_argument("--cooldown", type=float, default=5.0, help="seconds an unreachable replica is skipped")
    add_server_args(p)


def load_tokenizer(model: str | None):
    if model is None:
        return None
    from minfer.checkpoints import resolve_model
    from minfer.tokenizer import Tokenizer
    path = resolve_model(model)
    return Tokenizer.from_folder(path if path.is_dir() else path.parent)


def run_router(replicas, policy, args, tokenizer=None) -> None:
    import uvicorn
    router = Router(replicas, policy, tokenizer=tokenizer, block_size=args.block_size,
                    prefix_blocks=getattr(args, "prefix_blocks", 4), cooldown=getattr(args, "cooldown", 5.0))
    print(f"minfer router: {policy} over {len(replicas)} replicas at http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(build_router_app(router), host=args.host, port=args.port, log_level=args.log_level)


def main(args) -> int:
    if args.policy not in POLICIES:
        raise ValueError(f"--policy must be one of {POLICIES}, got {args.policy!r}")
    run_router(args.replica, args.policy, args, load_tokenizer(args.model))
    return 0


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    """Poll ``url/health`` until it answers 200 (RuntimeError if the process dies or time runs out)."""
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy within {timeout:g} s")


def start_minfer(argv: list[str], quiet: bool = False) -> tuple[str, subprocess.Popen]:
    """``minfer ARGV --port P`` as a child process on a free port of 127.0.0.1: (base URL, process)."""
    port = free_port()
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen([sys.executable, "-m", "minfer.cli", *argv, "--port", str(port)], stdout=out, stderr=out)
    return f"http://127.0.0.1:{port}", proc


def stop_processes(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """Ctrl-C them all (they drain and exit), then kill any that is still there after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_replicas(args) -> int:
    """``minfer serve --replicas N``: N `minfer serve` children on free ports, the router on --port."""
    if args.policy not in POLICIES:
        raise ValueError(f"--policy must be one of {POLICIES}, got {args.policy!r}")
    from minfer.serving.http_common import engine_flags, served_name
    child = ["serve", "--model", str(args.model), "--dtype", args.dtype,
             "--served-model-name", served_name(args), *engine_flags(args),
             "--max-waiting", str(args.max_waiting), "--max-body-bytes", str(args.max_body_bytes),
             "--log-level", args.log_level]
    for flag, value in (("--device", args.device), ("--threads", args.threads)):
        if value is not None:
            child += [flag, str(value)]

    def interrupt(signum, frame):        # Ctrl-C / SIGTERM while the replicas start: still stop them
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    started = [start_minfer(child) for _ in range(args.replicas)]
    try:
        for url, proc in started:
            wait_healthy(url, proc)
        args.prefix_blocks, args.cooldown = 4, 5.0
        run_router([u for u, _ in started], args.policy, args,
                   load_tokenizer(args.model) if args.policy == "prefix_aware" else None)
    except KeyboardInterrupt:
        pass
    finally:
        stop_processes([p for _, p in started])
    return 0
