"""``minfer router --replica URL ... --policy round_robin|least_loaded|prefix_aware``. ``prefix_aware``
hashes the prompt's first blocks (``minfer.kv.block_pool.block_hashes``) onto a consistent-hash ring
(Karger et al. 1997). Bodies are forwarded unchanged; a replica that fails is marked down and its
waiting requests move, as SGLang's router and llm-d do (the failure rules: docs/serving.md).
"""
import argparse
import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import math
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Sequence

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from minfer.cli_args import positive_int, seconds_or_zero
from minfer.distributed.comm import free_port
from minfer.serving.http_common import (MAX_BODY_BYTES, add_server_args, check_host, decode_json, engine_flags,
                                        new_app, read_body, run_server, seconds, served_name)
from minfer.serving.openai_api import (APIError, ChatCompletionRequest, CompletionRequest, parse_body,
                                       prompt_ids)

log = logging.getLogger("minfer.router")

POLICIES = ("round_robin", "least_loaded", "prefix_aware")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"--policy must be one of {POLICIES}, got {policy!r}")


# --- Consistent hashing ---
def stable_hash(data: bytes | str) -> int:
    """A 64-bit hash that is the same in every process (Python's str hash is salted)."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def ring_lookup(points: Sequence[int], owners: Sequence[int], key: int) -> int:
    """The owner of the first ring point at or after ``key`` (wrapping); ``owners[i]`` owns ``points[i]``."""
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
        return next((owner for owner in self.owners[i:] + self.owners[:i] if alive[owner]), None)


def prefix_key(token_ids: Sequence[int], block_size: int = 16, num_blocks: int = 4) -> int:
    """Routing key: the chained hash of the first ``num_blocks`` full blocks (all tokens if shorter)."""
    from minfer.kv.block_pool import block_hashes
    head = list(token_ids[:block_size * num_blocks])
    hashes = block_hashes(head, block_size)
    return stable_hash(str(hashes[-1] if hashes else tuple(head)))


# --- Policies ---
class Router:
    """Picks a replica per request and keeps their health and load."""

    def __init__(self, replicas: Sequence[str], policy: str = "round_robin", *, tokenizer=None,
                 block_size: int = 16, prefix_blocks: int = 4, cooldown: float = 5.0):
        check_policy(policy)
        if not replicas:
            raise ValueError("give at least one --replica URL")
        self.replicas = [r.rstrip("/") for r in replicas]
        self.policy, self.tokenizer = policy, tokenizer
        self.block_size, self.prefix_blocks, self.cooldown = block_size, prefix_blocks, cooldown
        self.ring = HashRing(self.replicas)
        self.in_flight = [0] * len(self.replicas)     # counted from the moment a replica is chosen
        self.down_until = [0.0] * len(self.replicas)
        self._next = 0

    def alive(self) -> list[bool]:
        now = time.monotonic()
        return [now >= t for t in self.down_until]

    def prompt_ids(self, path: str, body: dict) -> list[int]:
        """The prompt's token ids as the engine will see them (chat template applied); without a
        tokenizer the characters stand in for tokens. APIError for a malformed body."""
        chat = "chat" in path
        req = parse_body(ChatCompletionRequest if chat else CompletionRequest, body)
        if self.tokenizer is not None:
            return prompt_ids(req, self.tokenizer)
        text = "".join(f"{m.role}:{m.text()}\n" for m in req.messages) if chat else req.prompt
        return [ord(c) for c in text] if isinstance(text, str) else list(text)

    def choose(self, path: str, body: dict, exclude: Sequence[int] = ()) -> int | None:
        """The replica for this request, not one of ``exclude`` (None: every other replica is down)."""
        alive = [a and i not in exclude for i, a in enumerate(self.alive())]
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


# --- The app ---
CONNECT_TIMEOUT = 2.0          # seconds to open a connection to a replica (--connect-timeout)
FIRST_BYTE_TIMEOUT = 300.0     # seconds to a replica's response head (a whole answer's: at its end)
READ_TIMEOUT = 300.0           # seconds between two reads of a response (--read-timeout)
HEALTH_INTERVAL = 5.0          # seconds between two active health checks (--health-interval; 0: none)
HEALTH_TIMEOUT = 5.0           # seconds a replica's /health may take (--health-timeout)


class ReplicaFailed(Exception):
    """The replica gave no response head: refused, timed out, or failed a health check meanwhile."""


class RouterMetrics:
    def __init__(self, router: Router):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("minfer_router:requests", "requests forwarded", ["replica", "status"], registry=reg)
        self.in_flight = Gauge("minfer_router:in_flight", "requests in flight", ["replica"], registry=reg)
        up = Gauge("minfer_router:replica_up", "1 if the replica is not down", ["replica"], registry=reg)
        for i, url in enumerate(router.replicas):
            up.labels(url).set_function(lambda i=i: int(router.alive()[i]))
        self.latency = Histogram("minfer_router:request_latency_seconds", "router in -> last byte out",
                                 ["replica"], registry=reg)


class Forwarder:
    """Sends a request to the router's choice (another while nothing reached the client); relays the bytes."""

    def __init__(self, router: Router, *, connect_timeout: float = CONNECT_TIMEOUT,
                 first_byte_timeout: float = FIRST_BYTE_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 health_interval: float = HEALTH_INTERVAL, health_timeout: float = HEALTH_TIMEOUT):
        self.router, self.first_byte_timeout = router, first_byte_timeout
        self.health_interval, self.health_timeout = health_interval, health_timeout
        self.metrics = RouterMetrics(router)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.went_down: dict[int, asyncio.Event] = {}

    def down(self, i: int) -> None:
        """Mark replica i down; requests waiting for its first byte move elsewhere."""
        router = self.router                    # down until a health check passes, else for the cooldown
        router.down_until[i] = math.inf if self.health_interval > 0 else time.monotonic() + router.cooldown
        self.went_down.pop(i, asyncio.Event()).set()

    async def health_loop(self) -> None:
        """GET /health of every replica each ``health_interval`` s: down on failure, up on success."""
        async def check(i: int) -> bool:
            try:
                r = await self.client.get(f"{self.router.replicas[i]}/health", timeout=self.health_timeout)
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        while True:
            for i, ok in enumerate(await asyncio.gather(*(check(i) for i in range(len(self.router.replicas))))):
                if ok:
                    self.router.down_until[i] = 0.0
                elif self.router.alive()[i]:
                    self.down(i)
            await asyncio.sleep(self.health_interval)

    async def open(self, i: int, path: str, raw: bytes):
        """The replica's response (head received, body still streaming); ReplicaFailed otherwise."""
        req = self.client.build_request("POST", self.router.replicas[i] + path, content=raw,
                                        headers={"content-type": "application/json"})
        send = asyncio.ensure_future(self.client.send(req, stream=True))
        down = asyncio.ensure_future(self.went_down.setdefault(i, asyncio.Event()).wait())
        try:
            await asyncio.wait({send, down}, timeout=self.first_byte_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
        if not send.done():
            send.cancel()
            raise ReplicaFailed("no response head within the first-byte timeout, or a failed health check")
        try:
            return send.result()
        except httpx.TransportError as e:
            raise ReplicaFailed(type(e).__name__) from None

    async def forward(self, path: str, raw: bytes, body):
        router, tried = self.router, []
        while True:
            i = router.choose(path, body if isinstance(body, dict) else {}, exclude=tried)
            if i is None and tried:
                raise APIError(502, f"no replica answered (tried {', '.join(router.replicas[j] for j in tried)})",
                               code="bad_gateway")
            if i is None:
                raise APIError(503, "no replica is up; retry later", code="no_replica", headers={"Retry-After": "1"})
            router.in_flight[i] += 1               # counted now: concurrent requests see it (least_loaded)
            url, t0 = router.replicas[i], time.perf_counter()
            try:
                upstream = await self.open(i, path, raw)
                break
            except ReplicaFailed as e:
                router.in_flight[i] -= 1
                self.metrics.requests.labels(url, "502").inc()
                log.warning("replica %s failed (%s); trying another", url, e)
                self.down(i)
                tried.append(i)
            except BaseException:                   # our client left while we waited
                router.in_flight[i] -= 1
                raise
        self.metrics.in_flight.labels(url).inc()
        self.metrics.requests.labels(url, str(upstream.status_code)).inc()
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("retry-after",)}
        kind = upstream.headers.get("content-type")
        return StreamingResponse(self.relay(i, upstream, t0, "text/event-stream" in (kind or "")),
                                 status_code=upstream.status_code, headers=headers, media_type=kind)

    async def relay(self, i: int, upstream, t0: float, sse: bool):
        """The replica's bytes as they come; if it dies mid-stream, an error event and ``[DONE]``."""
        url, tail = self.router.replicas[i], b"\n\n"
        try:
            async for part in upstream.aiter_raw():
                tail = (tail + part)[-2:]
                yield part
        except httpx.HTTPError as e:
            self.down(i)
            log.warning("replica %s failed mid-response (%s)", url, type(e).__name__)
            if sse:
                err = APIError(502, f"replica {url} failed mid-stream ({type(e).__name__})", code="bad_gateway")
                yield ("" if tail == b"\n\n" else "\n\n") + f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"
        finally:                                    # also when our client disconnects: the replica aborts too
            await upstream.aclose()
            self.router.in_flight[i] -= 1
            self.metrics.in_flight.labels(url).dec()
            self.metrics.latency.labels(url).observe(time.perf_counter() - t0)


def build_router_app(router: Router, *, max_body_bytes: int = MAX_BODY_BYTES, **timeouts):
    """The router's app; ``timeouts``: ``Forwarder``'s (connect, first byte, read, health checks)."""
    fw = Forwarder(router, **timeouts)

    @asynccontextmanager
    async def lifespan(app):
        checks = asyncio.ensure_future(fw.health_loop()) if fw.health_interval > 0 else None
        yield
        if checks is not None:
            checks.cancel()
        await fw.client.aclose()

    app = new_app("minfer router", lifespan, fw.metrics.registry)

    @app.get("/health")
    async def health():
        if not any(router.alive()):
            raise APIError(503, "no replica is up", code="no_replica")
        return {"status": "ok", "replicas": dict(zip(router.replicas, router.alive()))}

    @app.get("/v1/models")
    async def models():
        for i, up in enumerate(router.alive()):
            if up:
                try:
                    r = await fw.client.get(f"{router.replicas[i]}/v1/models", timeout=fw.health_timeout)
                    return Response(r.content, r.status_code, media_type="application/json")
                except httpx.HTTPError:
                    fw.down(i)
        raise APIError(503, "no replica is up", code="no_replica")

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def forward(request: Request):
        raw = await read_body(request, max_body_bytes)
        return await fw.forward(request.url.path, raw, decode_json(raw))

    return app


# --- Commands: `minfer router` and `minfer serve --replicas N` ---
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Route OpenAI API requests over engine replicas (minfer serve processes)."
    p.add_argument("--replica", action="append", required=True, type=replica_url,
                   help="replica base URL, http://HOST:PORT (repeat for each)")
    p.add_argument("--policy", default="round_robin", help=f"one of {', '.join(POLICIES)} (default round_robin)")
    p.add_argument("--model", default=None,
                   help="model whose tokenizer and chat template prefix_aware hashes (default: characters)")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per hashed block (default 16)")
    p.add_argument("--prefix-blocks", type=positive_int, default=4,
                   help="blocks of the prompt that make the key (default 4)")
    add_router_timeouts(p)
    add_server_args(p)


def add_router_timeouts(p: argparse.ArgumentParser) -> None:
    """The router's timeouts (``minfer router`` and ``minfer serve --replicas N``), in seconds."""
    for flag, default, text in (
            ("--cooldown", 5.0, "a failed replica is skipped when no health check runs"),
            ("--connect-timeout", CONNECT_TIMEOUT, "to connect to a replica"),
            ("--first-byte-timeout", FIRST_BYTE_TIMEOUT, "to a replica's response head, then the next one"),
            ("--read-timeout", READ_TIMEOUT, "between two reads of a replica's response"),
            ("--health-interval", HEALTH_INTERVAL, "between health checks of the replicas; 0: none"),
            ("--health-timeout", HEALTH_TIMEOUT, "a replica's /health may take before it is marked down")):
        kind = seconds_or_zero if flag == "--health-interval" else seconds
        p.add_argument(flag, type=kind, default=default, help=f"seconds {text} (default {default:g})")


def replica_url(text: str) -> str:
    """argparse type for ``--replica``: http(s)://HOST:PORT[/path]."""
    from urllib.parse import urlsplit
    try:
        u = urlsplit(text)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and (u.port is None or 1 <= u.port <= 65535)
    except ValueError:                            # a port that is not a number
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must be a URL such as http://127.0.0.1:8001, got {text!r}")
    return text


def load_tokenizer(model: str | None):
    if model is None:
        return None
    from minfer.checkpoints import resolve_model
    from minfer.tokenizer import Tokenizer
    path = resolve_model(model)
    return Tokenizer.from_folder(path if path.is_dir() else path.parent)


def run_router(replicas, policy, args, tokenizer=None) -> None:
    router = Router(replicas, policy, tokenizer=tokenizer, block_size=args.block_size,
                    prefix_blocks=getattr(args, "prefix_blocks", 4), cooldown=args.cooldown)
    app = build_router_app(router, connect_timeout=args.connect_timeout, first_byte_timeout=args.first_byte_timeout,
                           read_timeout=args.read_timeout, health_interval=args.health_interval,
                           health_timeout=args.health_timeout, max_body_bytes=args.max_body_bytes)
    print(f"minfer router: {policy} over {len(replicas)} replicas at http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    run_server(app, args)


def main(args) -> int:
    check_policy(args.policy)
    check_host(args.host)
    run_router(args.replica, args.policy, args, load_tokenizer(args.model))
    return 0


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    """Poll ``url/health`` until it answers 200 (RuntimeError if the process dies or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with code {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy within {timeout:g} s")


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), even by ``kill -9``."""
    import ctypes
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


def start_minfer(argv: list[str], quiet: bool = False, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """``minfer ARGV --port P`` as a child on 127.0.0.1 that dies with this process -> (base URL, process)."""
    port = port or free_port()
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen([sys.executable, "-m", "minfer.cli", *argv, "--port", str(port)], stdout=out,
                            stderr=out, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
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


class Supervisor:
    """Keeps N replica processes alive: a child that exits restarts on its port after a backoff that
    doubles with each quick death (1 s, 2 s, ... at most ``max_backoff``), reset after a minute's run."""

    def __init__(self, argv: list[str], n: int, max_backoff: float = 30.0):
        import threading
        self.argv, self.max_backoff = argv, max_backoff
        self.children = [self._start() for _ in range(n)]
        self.started = [time.monotonic()] * n
        self.backoff = [1.0] * n
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="minfer-supervisor", daemon=True)

    def _watch(self) -> None:
        while not self.stopping.wait(0.5):
            for i, (url, proc) in enumerate(self.children):
                if proc.poll() is None:
                    continue
                ran = time.monotonic() - self.started[i]
                self.backoff[i] = 1.0 if ran > 60 else self.backoff[i]
                print(f"minfer serve: replica {url} exited with code {proc.returncode}; restarting in "
                      f"{self.backoff[i]:g} s", file=sys.stderr, flush=True)
                if self.stopping.wait(self.backoff[i]):
                    return
                self.backoff[i] = min(2 * self.backoff[i], self.max_backoff)
                self.children[i], self.started[i] = self._start(int(url.rsplit(":", 1)[1])), time.monotonic()

    def _start(self, port: int | None = None) -> tuple[str, subprocess.Popen]:
        url, proc = start_minfer(self.argv, port=port)
        print(f"minfer serve: replica {url} (pid {proc.pid})", file=sys.stderr, flush=True)
        return url, proc

    def stop(self) -> None:
        self.stopping.set()                      # the children first: those the thread started die with it
        stop_processes([p for _, p in self.children])
        if self.thread.is_alive():
            self.thread.join(5)


def serve_replicas(args) -> int:
    """``minfer serve --replicas N``: N `minfer serve` children on free ports, the router on --port."""
    check_policy(args.policy)
    child = ["serve", "--model", str(args.model), "--dtype", args.dtype,
             "--served-model-name", served_name(args), *engine_flags(args),
             "--max-waiting", str(args.max_waiting), "--max-body-bytes", str(args.max_body_bytes),
             "--log-level", args.log_level]
    for flag, value in (("--device", args.device), ("--threads", args.threads)):
        if value is not None:
            child += [flag, str(value)]
    for sig in (signal.SIGINT, signal.SIGTERM):     # while the replicas start too: they are stopped
        signal.signal(sig, signal.default_int_handler)
    sup = Supervisor(child, args.replicas)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            for url, proc in sup.children:
                wait_healthy(url, proc)
            sup.thread.start()
            run_router([u for u, _ in sup.children], args.policy, args,
                       load_tokenizer(args.model) if args.policy == "prefix_aware" else None)
    finally:
        sup.stop()
    return 0
