"""What the server and the router share: OpenAI-style HTTP errors, body reading, and the
command-line flags both pass on (the router starts servers with the same engine flags).

Kept apart from ``server.py`` so the router does not import the server (nor the server the
router at import time): ``server.main --replicas N`` hands over to ``router.serve_replicas``.
"""
from __future__ import annotations

import argparse
import json

from minfer.serving.openai_api import APIError

MAX_BODY_BYTES = 1 << 20


def error_response(err: APIError):
    from fastapi.responses import JSONResponse
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app) -> None:
    """Every error, ours or the framework's (404 path, 405 method), as OpenAI's error JSON."""
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)))


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
    """The decoded JSON body; 400 if malformed."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``LLM``'s engine arguments as flags, spelled as vLLM's (``vllm serve --help``)."""
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences running at once (default 32)")
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


def engine_args(args) -> dict:
    """The parsed flags of ``add_engine_args`` as ``LLM(...)`` keyword arguments."""
    return {name: getattr(args, name) for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                                                   "kv_cache_memory_bytes", "kv_cache_dtype", "decode_kernel",
                                                   "enable_prefix_caching")}


def engine_flags(args) -> list[str]:
    """The same flags back as a command line (for child processes)."""
    out = []
    for name, value in engine_args(args).items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def served_name(args) -> str:
    from pathlib import Path
    return getattr(args, "served_model_name", None) or Path(str(args.model)).name
