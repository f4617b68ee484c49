"""`minfer bench serve --url URL`: the serving benchmark measured from the client, over HTTP, next to
in-process (interleaved, the same definitions), then the cost of a token online vs batch (docs/measuring.md).
"""
import asyncio
import dataclasses
import json
import time
from functools import partial

from minfer.serving.metrics import RequestStats


async def _one(client, url: str, req, t0: float, model: str | None) -> tuple[RequestStats, list[str]]:
    await asyncio.sleep(max(0.0, t0 + req.arrival_time - time.perf_counter()))
    arrival = time.perf_counter()
    stats = RequestStats(arrival_time=arrival, num_prompt_tokens=len(req.prompt_token_ids))
    body = {"prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    texts, n_tokens = [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if event.get("usage") and not event["choices"]:
                n_tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                stats.token_times.append(now)
                texts.append(event["choices"][0]["text"])
    if n_tokens is not None and stats.token_times:
        stats.token_times += [stats.token_times[-1]] * max(0, n_tokens - len(stats.token_times))
    stats.finish_time = stats.token_times[-1] if stats.token_times else time.perf_counter()
    return stats, texts


def run_http(url: str, trace, model: str | None = None, timeout: float = 600.0):
    """Replay ``trace`` against a server in real time; (RequestStats list, duration, texts)."""
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(_one(client, url, r, t0, model) for r in trace))
            return res, t0

    res, t0 = asyncio.run(main())
    stats = [s for s, _ in res]
    return stats, max(s.finish_time for s in stats) - t0, ["".join(t) for _, t in res]


KEYS = [("ttft", "median"), ("ttft", "p90"), ("ttft", "p99"), ("tpot", "median"), ("tpot", "p99"),
        ("itl", "median"), ("itl", "p99"), ("e2el", "median")]


def _flat(m) -> dict:
    out = {f"{stat} {metric.upper()} (ms)": getattr(getattr(m, metric), stat) for metric, stat in KEYS}
    out["output throughput (tok/s)"] = m.output_throughput
    if m.goodput is not None:
        out["goodput (req/s)"] = m.goodput
        out["requests meeting all SLOs"] = m.good_requests
    return out


def main_http(args, llm, trace, slo, run_online) -> dict:
    """In-process vs HTTP on ``trace`` (interleaved rounds, medians), then online vs batch cost."""
    import httpx

    from minfer.bench.timing import interleaved, log, table
    from minfer.serving.cost import cost_rows
    from minfer.serving.metrics import summarize

    url = args.url.rstrip("/")
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    log(f"HTTP: {url} serves {model!r}; warm-up ...")
    run_http(url, trace[:1], model)

    runs = {"in-process": lambda: run_online(llm.model, llm.tokenizer, args, "continuous", trace),
            "HTTP": lambda: run_http(url, trace, model)}

    def timed(run):
        stats, duration, _ = run()
        return _flat(summarize(stats, duration=duration, slo_ms=slo))
    log(f"in-process vs HTTP, {len(trace)} requests at {args.rate:g} req/s, interleaved:")
    med = interleaved({name: partial(timed, run) for name, run in runs.items()}, repeats=args.repeats,
                      warmup=0, log=log)
    rows = [{"metric": k, "in": med["in-process"][k], "http": med["HTTP"][k],
             "ratio": med["HTTP"][k] / med["in-process"][k] if med["in-process"][k] else float("nan")}
            for k in med["HTTP"]]
    print(f"\n== client-side (HTTP) vs in-process: {len(trace)} requests at {args.rate:g} req/s, "
          f"medians of {args.repeats} interleaved rounds ==")
    print(table(rows, [("metric", "metric", "{}"), ("in", "in-process", "{:.1f}"), ("http", "HTTP", "{:.1f}"),
                       ("ratio", "HTTP / in-process", "{:.2f}")]))

    # the cost of a token: online (batch 1) vs batch, same requests, in-process
    at0 = [dataclasses.replace(r, arrival_time=0.0) for r in trace]
    thr = {}
    for name, seqs in (("online (batch 1)", 1), (f"batch ({args.max_num_seqs} at once)", args.max_num_seqs)):
        log(f"cost: {name} ...")
        saved, args.max_num_seqs = args.max_num_seqs, seqs
        stats, duration, _ = run_online(llm.model, llm.tokenizer, args, "continuous", at0)
        args.max_num_seqs = saved
        thr[name] = summarize(stats, duration=duration).output_throughput
    thr[f"HTTP at {args.rate:g} req/s"] = med["HTTP"]["output throughput (tok/s)"]
    cost = cost_rows(thr, args.price_per_hour, args.watts)
    print(f"\n== the cost of a token at ${args.price_per_hour:g}/h and {args.watts:g} W ==")
    print(table(cost, [("run", "run", "{}"), ("output_tok_s", "output tok/s", "{:.2f}"),
                       ("usd_per_mtok", "$ / Mtok", "{:.2f}"), ("kwh_per_mtok", "kWh / Mtok", "{:.2f}"),
                       ("x_cheapest", "x cheapest", "{:.1f}")]))
    return {"http_vs_in_process": rows, "cost": cost, "price_per_hour": args.price_per_hour, "watts": args.watts}
