"""`minfer bench serve --routing round_robin,prefix_aware`: routing policies on a shared-prefix workload.

Replicas and one router per policy on 127.0.0.1; 4 customers with long system prompts; reported:
the prefix-cache hit rate and the client-side TTFT (docs/measuring.md).
"""
import statistics
import time


def _workload(tokenizer, tag: str, prefix_tokens: int) -> list[tuple[str, str]]:
    from minfer.serving.workload import python_docs
    docs = python_docs()
    systems = []
    for k in range(4):
        ids = tokenizer.encode(f"[{tag}{k}] You answer questions about this text.\n" + docs[(37 * k + len(tag)) %
                                                                                       len(docs)][1])
        systems.append(tokenizer.decode(ids[:prefix_tokens]))
    return [(systems[k], f"Question {r}{j}: what is this about?") for r in range(2) for k in range(4)
            for j in range(2)]


def _ttft(url: str, model: str, system: str, question: str, max_tokens: int) -> float:
    from openai import OpenAI
    c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    t0 = time.perf_counter()
    stream = c.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                       messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": question}])
    first = None
    for ev in stream:
        if first is None and ev.choices and ev.choices[0].delta.content:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


def _cache_counts(replicas: list[str]) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families
    import httpx
    hits = queries = 0.0
    for url in replicas:
        for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
            for s in fam.samples:
                hits += s.value if s.name == "minfer:prefix_cache_hits_total" else 0.0
                queries += s.value if s.name == "minfer:prefix_cache_queries_total" else 0.0
    return hits, queries


def main_routing(args, tokenizer) -> dict:
    """Replicas and a router per policy started, the workload sent through each in turn, all stopped."""
    from minfer.bench.timing import log, names, table
    from minfer.serving.router import POLICIES, start_minfer, stop_processes, wait_healthy
    from minfer.serving.http_common import served_name

    policies = names(args.routing, "--routing", POLICIES)
    if args.replicas < 2:
        raise ValueError(f"--replicas must be >= 2 for a routing comparison, got {args.replicas}")
    threads = ["--threads", str(args.threads)] if args.threads else []
    model = served_name(args)
    replicas = [start_minfer(["serve", "--model", str(args.model), "--dtype", args.dtype, *threads], quiet=True)
                for _ in range(args.replicas)]
    routers = {p: start_minfer(["router", "--policy", p, "--model", str(args.model),
                                *(a for u, _ in replicas for a in ("--replica", u))], quiet=True) for p in policies}
    procs = [p for _, p in replicas] + [p for _, p in routers.values()]
    try:
        for url, proc in [*replicas, *routers.values()]:
            wait_healthy(url, proc)
        log(f"routing: {args.replicas} replicas and {len(policies)} routers up; warm-up ...")
        for url, _ in replicas:
            _ttft(url, model, "warm-up", "hi", 2)
        urls = [u for u, _ in replicas]
        ttfts = {p: [] for p in policies}
        counts = {p: [0.0, 0.0] for p in policies}
        for r in range(args.repeats):
            for p in policies:
                log(f"  round {r + 1}/{args.repeats}: {p} ...")
                h0, q0 = _cache_counts(urls)
                for system, question in _workload(tokenizer, f"{p[:2]}{r}", args.prefix_tokens):
                    ttfts[p].append(_ttft(routers[p][0], model, system, question, 8))
                h1, q1 = _cache_counts(urls)
                counts[p][0] += h1 - h0
                counts[p][1] += q1 - q0
    finally:
        stop_processes(procs)
    rows = [{"policy": p, "hit_rate": counts[p][0] / counts[p][1], "hits": counts[p][0], "queries": counts[p][1],
             "ttft_median": 1000 * statistics.median(ttfts[p]), "ttft_mean": 1000 * statistics.fmean(ttfts[p]),
             "ttft_p90": 1000 * statistics.quantiles(ttfts[p], n=10, method="inclusive")[-1]} for p in policies]
    base = rows[0]
    for row in rows:
        row["x_ttft"] = base["ttft_mean"] / row["ttft_mean"]
    print(f"\n== routing over {args.replicas} replicas: 4 system prompts of {args.prefix_tokens} tokens x 4 "
          f"questions, {args.repeats} interleaved round(s), one request at a time ==")
    print(table(rows, [("policy", "policy", "{}"), ("hit_rate", "prefix-cache hit rate", "{:.1%}"),
                       ("hits", "cached tokens", "{:.0f}"), ("queries", "prompt tokens", "{:.0f}"),
                       ("ttft_median", "median TTFT ms", "{:.0f}"), ("ttft_p90", "p90 TTFT ms", "{:.0f}"),
                       ("ttft_mean", "mean TTFT ms", "{:.0f}"),
                       ("x_ttft", f"mean TTFT: {base['policy']} / this", "{:.2f}")]))
    return {"routing": rows, "replicas": args.replicas, "prefix_tokens": args.prefix_tokens}
