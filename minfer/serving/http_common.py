"""What the server and the router share: the app's errors and /metrics, body reading, the command-line
flags (the router starts servers with the same engine flags); apart, so neither imports the other.
"""
import argparse
import contextlib
import json
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from minfer.cli_args import add_parallel_args, int_in, positive_int, seconds
from minfer.serving.openai_api import APIError

MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT = 10.0                   # seconds to send the request head (--header-timeout)
KEEP_ALIVE_TIMEOUT = 5.0                # seconds an idle keep-alive connection stays open
MAX_HEADER_BYTES = 16 * 1024            # a request head larger than this gets 400 (h11's own default)
MAX_JSON_DEPTH = 32                     # nesting of a request body (OpenAI's bodies need about 5)


def new_app(title: str, lifespan, registry):
    """A FastAPI app whose every error, ours or the framework's (404 path, 405 method), is OpenAI's
    error JSON, with ``GET /metrics``: ``registry`` in Prometheus text."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    app = FastAPI(title=title, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        err = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return app


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body; 413 past ``limit`` bytes (without reading further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
    return bytes(data)


def decode_json(raw: bytes):
    """The decoded JSON body; 400 if malformed, nested deeper than ``MAX_JSON_DEPTH``, holding an
    integer of more digits than Python converts (4,300), or a string with a lone surrogate."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    except ValueError as e:                     # JSONDecodeError, UnicodeDecodeError, a 5,000-digit integer
        raise APIError(400, f"the body is not valid JSON: {e}"[:300], code="invalid_json") from None
    check_json_values(body)
    return body


def check_json_values(body) -> None:
    """400 naming the field for a body nested too deeply or a string that is not valid Unicode
    (a lone surrogate such as ``"\\ud800"`` cannot be encoded, nor tokenized)."""
    stack = [(body, (), 1)]
    while stack:                                # iterative: a deep body must not recurse here either
        value, path, depth = stack.pop()
        where = ".".join(map(str, path)) or "the body"
        if depth > MAX_JSON_DEPTH:                 # named by its top-level field
            top = str(path[0]) if path else None
            raise APIError(400, f"{top or 'the body'}: nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           param=top, code="invalid_json")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{where}: not valid Unicode (a lone surrogate such as '\\ud800')",
                               param=where) from None
        elif isinstance(value, dict):
            stack += [(k, path, depth + 1) for k in value]
            stack += [(v, path + (k,), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, path + (i,), depth + 1) for i, v in enumerate(value)]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``LLM``'s engine arguments as flags, spelled as vLLM's (``vllm serve --help``)."""
    p.add_argument("--max-num-seqs", type=positive_int, default=32, help="sequences at once (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step (default 512)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=2**30,
                   help="the KV pool's budget in bytes (default 1 GiB; the pool never exceeds the context)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) | int8 | fp8 (default auto)")
    p.add_argument("--decode-kernel", default="auto", choices=["auto", "torch", "cpu", "triton"],
                   help="how eager decode steps read the paged KV pool: auto (the C++ kernel on a CPU in float32 when it builds, "
                   "else torch) | torch (gather + SDPA) | cpu (the C++ kernel) | triton (the Triton kernel)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="automatic prefix caching (default on; --no-enable-prefix-caching turns it off)")
    p.add_argument("--logprobs-mode", default="raw_logprobs", choices=["raw_logprobs", "processed_logprobs"],
                   help="what logprobs report: the model's distribution (raw_logprobs, default) or the one "
                   "sampled from after temperature/top-k/top-p (processed_logprobs)")
    add_parallel_args(p)


def engine_args(args) -> dict:
    """The parsed flags of ``add_engine_args`` as ``LLM(...)`` keyword arguments."""
    return {name: getattr(args, name) for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                                                   "kv_cache_memory_bytes", "kv_cache_dtype", "decode_kernel",
                                                   "enable_prefix_caching", "logprobs_mode",
                                                   "tensor_parallel_size", "pipeline_parallel_size")}


def engine_flags(args) -> list[str]:
    """The same flags back as a command line (for child processes)."""
    out = []
    for name, value in engine_args(args).items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    p.add_argument("--header-timeout", type=seconds, default=HEADER_TIMEOUT,
                   help=f"seconds a new connection may take to send its request headers (default {HEADER_TIMEOUT:g})")
    p.add_argument("--keep-alive-timeout", type=seconds, default=KEEP_ALIVE_TIMEOUT,
                   help=f"seconds an idle keep-alive connection stays open (default {KEEP_ALIVE_TIMEOUT:g})")
    p.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES,
                   help="largest request body (413 above)")


def check_host(host: str) -> None:
    """``--host`` must be an address this machine can listen on (ValueError naming the flag)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind((infos[0][4][0], 0))
    except (OSError, UnicodeError) as e:
        raise ValueError(f"--host {host!r}: cannot listen there ({e})") from None


def header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol plus a header timeout: a connection without a whole request head
    ``timeout`` s after opening (or its last response) is closed, so slowloris clients cannot hold
    sockets (uvicorn's ``timeout_keep_alive`` covers only idle connections after a response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def _arm(self) -> None:
            cycle = self.cycle
            self.loop.call_later(timeout, lambda: self._expire(cycle))

        def _expire(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():   # no new request began
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

    return HeaderTimeoutH11


def run_server(app, args, *, graceful: float | None = None, on_shutdown=None) -> None:
    """uvicorn with the flags' header and keep-alive timeouts, at most ``graceful`` s for running
    requests on Ctrl-C; ``on_shutdown()`` runs when shutdown begins (the server's drain)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            if on_shutdown is not None:
                on_shutdown()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            http=header_timeout_protocol(args.header_timeout),
                            timeout_keep_alive=args.keep_alive_timeout, timeout_graceful_shutdown=graceful,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    with contextlib.suppress(KeyboardInterrupt):    # uvicorn raises the Ctrl-C again once it has shut down
        Server(config).run()


def served_name(args) -> str:
    return getattr(args, "served_model_name", None) or Path(str(args.model)).name
