"""``minfer serve [MODEL]``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, as vLLM's).

    minfer serve smollm2-135m-instruct --host 127.0.0.1 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "stream": true}'

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``"stream": true`` gives server-sent events ending in ``data: [DONE]``),
``GET /health``, ``GET /metrics`` (Prometheus text).

How a request travels: the handler parses the body (``openai_api``), tokenizes
the prompt (after the chat template), and submits it to the ``AsyncEngine``,
whose thread steps the engine for everyone; the handler then awaits its own
queue of deltas. If the client goes away, the request is aborted and its KV
blocks go back to the pool. When ``--max-waiting`` requests are already queued,
a new one gets 503 with ``Retry-After`` instead of a growing queue. Ctrl-C
stops accepting connections, lets running streams finish for
``--drain-seconds``, then aborts the rest. vLLM: ``vllm/entrypoints/openai/api_server.py``.

``--replicas N`` starts N such servers as child processes and the router
(``minfer.serving.router``) in front of them on ``--port``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from contextlib import asynccontextmanager

from fastapi import Request

from minfer.cli_args import add_model_args
from minfer.serving.http_common import (  # noqa: F401  (re-exported: the server's own names)
    MAX_BODY_BYTES,
    add_engine_args,
    add_server_args,
    decode_json,
    engine_args,
    engine_flags,
    install_error_handlers,
    read_body,
    served_name,
)
from minfer.serving.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    new_id,
    parse_body,
    response,
    sampling_params,
    usage,
)

def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


def build_app(aengine, model_name: str, *, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app over an ``AsyncEngine`` (started and stopped with the app)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        yield
        aengine.stop()

    app = FastAPI(title="minfer", lifespan=lifespan)
    install_error_handlers(app)
    created = int(time.time())
    tok = aengine.tokenizer

    @app.get("/health")
    async def health():
        if not aengine.is_alive():
            raise APIError(503, "the engine thread is not running", code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(aengine.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minfer", "max_model_len": aengine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(CompletionRequest, decode_json(await read_body(request, max_body_bytes)))
        ids = tok.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        return await serve(request, req, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_body(ChatCompletionRequest, decode_json(await read_body(request, max_body_bytes)))
        msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        try:
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
        except Exception as e:                       # the template may refuse a conversation
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        return await serve(request, req, tok.encode(prompt), chat=True)

    async def serve(request, req, ids: list[int], *, chat: bool):
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model: unknown model {req.model!r}; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        params = sampling_params(req, len(ids), aengine.max_model_len, chat=chat)
        if aengine.num_waiting >= aengine.max_waiting:
            raise APIError(503, f"the server is full ({aengine.num_waiting} requests waiting); retry later",
                           code="overloaded", headers={"Retry-After": "1"})
        rid = new_id("chatcmpl" if chat else "cmpl")
        try:
            q = await aengine.submit(rid, ids, params)
        except ValueError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(rid, q, params.n, chat, include), media_type="text/event-stream")
        return JSONResponse(await collect(request, rid, q, params.n, chat))

    async def stream(rid, q, n: int, chat: bool, include_usage: bool):
        """Server-sent events; with n > 1 the choices' deltas interleave, each carrying its index."""
        done, num_output = 0, 0
        try:
            if chat:
                for i in range(n):
                    yield sse(chunk(rid, model_name, True, "", index=i, role=True, with_usage=include_usage))
            while done < n:
                out = await q.get()
                if out.error:
                    yield sse(APIError(500, out.error).body())
                    break
                if out.finished:
                    done, num_output = done + 1, num_output + out.num_output_tokens
                if out.text or out.finished:
                    yield sse(chunk(rid, model_name, chat, out.text, out.finish_reason if out.finished else None,
                                    index=out.index, with_usage=include_usage))
            if done == n and include_usage:
                yield sse(chunk(rid, model_name, chat, None, use=usage(out.num_prompt_tokens, num_output)))
            yield "data: [DONE]\n\n"
        finally:                                   # also when the client disconnected (cancelled)
            if done == n:
                aengine.release(rid)
            else:
                aengine.abort(rid)

    async def collect(request, rid, q, n: int, chat: bool) -> dict:
        texts, reasons, num_output = [[] for _ in range(n)], [None] * n, 0
        try:
            done = 0
            while done < n:
                try:
                    out = await asyncio.wait_for(q.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the connection") from None
                    continue
                if out.error:
                    raise APIError(500, out.error)
                texts[out.index].append(out.text)
                if out.finished:
                    done, num_output = done + 1, num_output + out.num_output_tokens
                    reasons[out.index] = out.finish_reason
            return response(rid, model_name, chat, [("".join(t), r) for t, r in zip(texts, reasons)],
                            usage(out.num_prompt_tokens, num_output))
        finally:
            aengine.abort(rid)                    # a no-op for a finished request

    return app


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /metrics."
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model (same as --model)")
    add_model_args(p)
    add_server_args(p)
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: the model's)")
    add_engine_args(p)
    p.add_argument("--max-waiting", type=int, default=64,
                   help="queued requests before new ones get 503 + Retry-After (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (413 above)")
    p.add_argument("--drain-seconds", type=float, default=5.0,
                   help="on Ctrl-C, how long running streams may finish before they are aborted")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--replicas", type=int, default=1, help="N > 1: N engine processes behind a router")
    p.add_argument("--policy", default="prefix_aware", help="router policy with --replicas (default prefix_aware)")


def main(args) -> int:
    import uvicorn
    if args.model_pos:
        args.model = args.model_pos
    for name in ("max_num_seqs", "max_waiting", "max_body_bytes", "replicas"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.replicas > 1:
        from minfer.serving.router import serve_replicas
        return serve_replicas(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from minfer.serving.async_engine import AsyncEngine, build_engine
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, **engine_args(args))
    app = build_app(AsyncEngine(engine, max_waiting=args.max_waiting), served_name(args),
                    max_body_bytes=args.max_body_bytes)
    print(f"minfer serve: {served_name(args)} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_seconds)
    return 0
