"""``minfer serve [MODEL]``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, as vLLM's
``vllm/entrypoints/openai/api_server.py``). A handler tokenizes the prompt, submits it to the
``AsyncEngine`` (whose thread steps the engine for everyone) and awaits its own queue of deltas; a
client gone aborts its request. Endpoints, ``--replicas N``, backpressure, drain, limits: docs/serving.md.
"""
import argparse
import asyncio
import json
import sys
import time
from contextlib import asynccontextmanager

from fastapi import Request

from minfer.cli_args import add_model_args, int_in, positive_int, seconds_or_zero, set_threads
from minfer.serving.http_common import (MAX_BODY_BYTES, add_engine_args, add_server_args, check_host,
                                        decode_json, engine_args, new_app, read_body, run_server, served_name)
from minfer.serving.openai_api import (APIError, ChatCompletionRequest, ChoiceShape, CompletionRequest,
                                       choice_shape, chunk, new_id, parse_body, prompt_ids, response,
                                       sampling_params, usage)
from minfer.serving.router import add_router_timeouts, serve_replicas

MAX_REPLICAS = 64                        # engine processes one `serve --replicas N` may start


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(aengine, model_name: str, *, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app over an ``AsyncEngine`` (started and stopped with the app)."""
    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        yield
        aengine.stop()

    app = new_app("minfer", lifespan, aengine.registry)
    created = int(time.time())
    handlers = Handlers(aengine, model_name, max_body_bytes)

    @app.get("/health")
    async def health():
        if not aengine.is_alive():
            raise APIError(503, "the engine thread is not running", code="engine_dead")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minfer", "max_model_len": aengine.max_model_len}]}

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def generate(request: Request):
        chat = request.url.path.endswith("/chat/completions")
        return await handlers.serve(request, ChatCompletionRequest if chat else CompletionRequest)

    return app


def longest_token_chars(tok) -> int:
    """Characters of the longest token: a text longer than context x this cannot fit the context."""
    try:
        vocab = tok._tok.get_vocab(with_added_tokens=True)
    except AttributeError:                       # a tokenizer without a vocabulary listing: a wide bound
        return 256
    return max((len(t) for t in vocab), default=1) or 1


class Handlers:
    """The generation endpoints. Tokenizing runs in a worker thread (a 1 MB body must not stall other
    streams), after a cap: over ``max_model_len x longest token`` characters cannot fit the context."""

    def __init__(self, aengine, model_name: str, max_body_bytes: int):
        self.aengine, self.model_name, self.max_body_bytes = aengine, model_name, max_body_bytes
        self.tok = aengine.tokenizer
        self.max_chars = aengine.max_model_len * longest_token_chars(self.tok)

    async def serve(self, request, model: type[CompletionRequest] | type[ChatCompletionRequest]):
        from fastapi.responses import JSONResponse, StreamingResponse
        req = parse_body(model, decode_json(await read_body(request, self.max_body_bytes)))
        chat, aengine, model_name = model is ChatCompletionRequest, self.aengine, self.model_name
        field = "messages" if chat else "prompt"
        chars = sum(len(m.text()) for m in req.messages) if chat else \
            len(req.prompt) if isinstance(req.prompt, str) else 0    # token ids: checked in tokens, below
        if chars > self.max_chars:
            raise APIError(400, f"{field}: {chars} characters cannot fit the model's context of "
                                f"{aengine.max_model_len} tokens (at most {self.max_chars} characters)",
                           param=field, code="context_length_exceeded")
        ids = await asyncio.to_thread(prompt_ids, req, self.tok)
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model: unknown model {req.model!r}; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        params = sampling_params(req, len(ids), aengine.max_model_len, chat=chat)
        if aengine.num_waiting >= aengine.max_waiting:
            raise APIError(503, f"the server is full ({aengine.num_waiting} requests waiting); retry later",
                           code="overloaded", headers={"Retry-After": "1"})
        rid = new_id("chatcmpl" if chat else "cmpl")
        shape = choice_shape(req, ids, params, self.tok, chat=chat)
        try:
            q = await aengine.submit(rid, ids, params)
        except ValueError as e:
            raise APIError(400, str(e), param=field) from None
        if req.stream:
            so = req.stream_options
            include = bool(so and so.include_usage)
            live = len(ids) if include and so.continuous_usage_stats else None
            return StreamingResponse(self.stream(rid, q, params.n, chat, include, shape, live),
                                     media_type="text/event-stream")
        return JSONResponse(await self.collect(request, rid, q, params.n, chat, shape))

    async def stream(self, rid, q, n: int, chat: bool, include_usage: bool, shape: ChoiceShape,
                     live: int | None = None):
        """Server-sent events; with n > 1 the choices' deltas interleave, each carrying its index.
        An engine error (or the end of the drain at shutdown) is an error event, then ``[DONE]``.
        ``live``: the prompt's length, to put the usage so far on every chunk (continuous_usage_stats)."""
        done, num_output, model_name, so_far = 0, 0, self.model_name, 0
        first, offset = [True] * n, [0] * n
        try:
            if chat:
                for i in range(n):
                    yield sse(chunk(rid, model_name, True, "", index=i, role=True, with_usage=include_usage,
                                    use=None if live is None else usage(live, 0)))
            while done < n:
                out = await q.get()
                if out.error:
                    yield sse(APIError(500, out.error).body())
                    break
                if out.finished:
                    done, num_output = done + 1, num_output + (out.num_output_tokens if shape.generated else 0)
                text, lp = shape.piece(out.text, out.token_ids, out.logprobs, out.prompt_logprobs,
                                       first[out.index], offset[out.index])
                first[out.index] = False
                so_far += len(out.token_ids) if shape.generated else 0
                if lp is not None and not chat:
                    offset[out.index] += sum(map(len, lp["tokens"]))
                if text or out.finished or (lp is not None and out.token_ids):
                    yield sse(chunk(rid, model_name, chat, text, out.finish_reason if out.finished else None,
                                    index=out.index, with_usage=include_usage, logprobs=lp,
                                    use=None if live is None else usage(live, so_far)))
            if done == n and include_usage:
                yield sse(chunk(rid, model_name, chat, None, use=usage(out.num_prompt_tokens, num_output)))
            yield "data: [DONE]\n\n"
        finally:                                   # also when the client disconnected (cancelled)
            (self.aengine.release if done == n else self.aengine.abort)(rid)

    async def collect(self, request, rid, q, n: int, chat: bool, shape: ChoiceShape) -> dict:
        """The whole answer; a client that disconnects meanwhile frees its KV blocks within a step."""
        texts, reasons, num_output = [[] for _ in range(n)], [None] * n, 0
        ids, dicts, prompt_dicts = [[] for _ in range(n)], [[] for _ in range(n)], None
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            done = 0
            while done < n:
                getter = asyncio.ensure_future(q.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    raise APIError(499, "the client closed the connection")
                out = getter.result()
                if out.error:
                    raise APIError(500, out.error)
                texts[out.index].append(out.text)
                ids[out.index] += out.token_ids
                dicts[out.index] += out.logprobs or []
                prompt_dicts = out.prompt_logprobs or prompt_dicts
                if out.finished:
                    done, num_output = done + 1, num_output + (out.num_output_tokens if shape.generated else 0)
                    reasons[out.index] = out.finish_reason
            pieces = [shape.piece("".join(texts[i]), ids[i], dicts[i], prompt_dicts, True) for i in range(n)]
            return response(rid, self.model_name, chat, [(t, r, lp) for (t, lp), r in zip(pieces, reasons)],
                            usage(out.num_prompt_tokens, num_output))
        finally:
            gone.cancel()
            self.aengine.abort(rid)                # a no-op for a finished request


async def wait_disconnect(request) -> None:
    """Return when the client has closed the connection (ASGI ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /metrics."
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model (same as --model)")
    add_model_args(p)
    add_server_args(p)
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: the model's)")
    add_engine_args(p)
    p.add_argument("--max-waiting", type=positive_int, default=64,
                   help="queued requests before new ones get 503 + Retry-After (default 64)")
    p.add_argument("--drain-seconds", type=seconds_or_zero, default=5.0,
                   help="on Ctrl-C, how long running streams may finish before they are aborted")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--replicas", type=int_in(1, MAX_REPLICAS), default=1,
                   help="N > 1: N engine processes behind a router")
    p.add_argument("--policy", default="prefix_aware", help="router policy with --replicas (default prefix_aware)")
    add_router_timeouts(p)


def check_pool(engine) -> None:
    """The KV pool must hold one request of the whole context (ValueError naming the flag)."""
    kv, cache = engine.runner.kv_manager, engine.runner.cache
    pool, need = kv.pool, kv.max_blocks(int(engine.max_model_len), 0)
    if pool.num_blocks < need:
        minimum = need * -(-cache.nbytes() // cache.num_blocks)
        raise ValueError(f"--kv-cache-memory-bytes: the pool holds {pool.num_blocks} blocks of {pool.block_size} "
                         f"tokens, less than one request of the model's context ({engine.max_model_len} tokens); "
                         f"give at least {minimum} bytes")


def main(args) -> int:
    if args.model_pos:
        args.model = args.model_pos
    check_host(args.host)                  # before anything is loaded
    if args.replicas > 1:
        return serve_replicas(args)
    set_threads(args.threads)
    from minfer.serving.async_engine import AsyncEngine, build_engine
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, **engine_args(args))
    check_pool(engine)
    aengine = AsyncEngine(engine, max_waiting=args.max_waiting)
    app = build_app(aengine, served_name(args), max_body_bytes=args.max_body_bytes)
    print(f"minfer serve: {served_name(args)} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)",
          file=sys.stderr, flush=True)

    def drain():                 # Ctrl-C: streams may finish for --drain-seconds, then end with an error event
        asyncio.get_running_loop().call_later(args.drain_seconds, aengine.abort_all, "the server is shutting down")

    run_server(app, args, graceful=args.drain_seconds + 5, on_shutdown=drain)
    return 0
