"""`minfer bench serve`: serving policies under a workload; TTFT, TPOT, throughput, goodput.

Online (--rate), offline baselines (--baselines) and the front door (--front-door), on one seeded trace;
``--url`` measures a running server (serve_http.py), ``--routing`` router policies (serve_route.py).
What each part measures: docs/measuring.md.
"""
import argparse
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch

from minfer.bench.report import TABLES
from minfer.bench.timing import interleaved, log, names, table, write_json
from minfer.cli_args import add_model_args, positive_int, set_threads
from minfer.engine import LLMEngine, run_trace
from minfer.generate import generate_tokens
from minfer.sampling import SamplingParams
from minfer.serving.metrics import RequestStats, format_table, summarize

BASELINES = ("sequential", "alone", "torch-decode", "transformers", "float32")


def _range(s: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI (e.g. 16:512), got {s!r}") from None
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.serving.cost import DEFAULT_PRICE_PER_HOUR, DEFAULT_WATTS
    add_model_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--policy", default="static,continuous",
                   help="comma-separated: static, dynamic, continuous (default static,continuous)")
    p.add_argument("--rate", type=float, default=0.2, help="arrival rate, requests/s; inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    p.add_argument("--num-requests", type=positive_int, default=32)
    p.add_argument("--prompt-len", type=_range, default=(16, 512), help="LO:HI prompt tokens (default 16:512)")
    p.add_argument("--output-len", type=_range, default=(16, 256), help="LO:HI output tokens (default 16:256)")
    p.add_argument("--dataset", choices=["text", "random"], default="text",
                   help="text: Python's docs as summarisation prompts; random: random token ids")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in ms (enables goodput)")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in ms (enables goodput)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="running requests at most = static batch size")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    p.add_argument("--max-wait-ms", type=float, default=2000.0, help="dynamic batching's wait (default 2000)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="eager decode steps; --no-enforce-eager: the static step (default: LLM's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-kernel", default="auto", choices=["auto", "torch", "cpu", "triton"],
                   help="how eager decode steps read the KV pool (auto: the C++ kernel on a CPU)")
    p.add_argument("--baselines", default="",
                   help="offline throughput against, comma-separated: " + ", ".join(BASELINES))
    p.add_argument("--batch-invariant", action="store_true",
                   help="bf16: each request's numbers independent of its batch (docs/kernels.md)")
    p.add_argument("--front-door", action="store_true",
                   help="LLM.generate on the whole list vs the same LLM fed one prompt at a time")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the offline comparison (medians)")
    p.add_argument("--sweep-rates", default="", help="comma-separated rates for the throughput-latency plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench_results/serve", help="plots and JSON go here")
    p.add_argument("--url", default=None,
                   help="a running `minfer serve`: HTTP vs in-process, then online vs batch cost")
    p.add_argument("--price-per-hour", type=float, default=DEFAULT_PRICE_PER_HOUR,
                   help=f"$ per hour of the machine, with --url (default {DEFAULT_PRICE_PER_HOUR}: a 2-vCPU cloud VM)")
    p.add_argument("--routing", default=None,
                   help="compare router policies instead, e.g. round_robin,prefix_aware (serve_route.py)")
    p.add_argument("--replicas", type=int, default=2, help="replicas for --routing (default 2)")
    p.add_argument("--prefix-tokens", type=int, default=256, help="system-prompt tokens for --routing (default 256)")
    p.add_argument("--watts", type=float, default=DEFAULT_WATTS,
                   help=f"power drawn, with --url (default {DEFAULT_WATTS:g}: an H100's board power)")


def _params(r):
    return SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)


def _engine(model, tok, args, policy, max_len: int = 64, decode_kernel=None):
    """The engine under test; on the static path its width is the trace's longest request (``max_len``).
    ``decode_kernel``: None = ``--decode-kernel``."""
    eager, w = args.enforce_eager, model.model.embed_tokens.weight
    if eager is None:
        eager = w.device.type != "cuda"
    invariant = args.batch_invariant and w.dtype == torch.bfloat16 and decode_kernel is None
    return LLMEngine.from_model(model, tok, policy=policy, max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens,
                                max_wait_ms=args.max_wait_ms, block_size=args.block_size,
                                enable_prefix_caching=False,
                                enforce_eager=eager, max_seq_len_to_capture=None if eager else max_len,
                                decode_kernel=decode_kernel or args.decode_kernel, batch_invariant=invariant)


def run_online(model, tok, args, policy, trace, decode_kernel=None):
    """Replay the trace in real time through the engine -> (RequestStats list, seconds, output tokens)."""
    eng = _engine(model, tok, args, policy,
                  max_len=max(len(r.prompt_token_ids) + r.max_tokens for r in trace), decode_kernel=decode_kernel)
    reqs, duration = run_trace(eng, trace, _params)
    return [r.stats for r in reqs], duration, [r.output_token_ids for r in reqs]


def run_alone(model, tok, args, trace):
    """The engine under test fed one request at a time: the reference of batch invariance."""
    eng, t0, reqs = _engine(model, tok, args, "continuous"), time.perf_counter(), []
    for r in trace:
        reqs += run_trace(eng, [r], _params)[0]
        reqs[-1].stats.arrival_time = t0
    return [r.stats for r in reqs], time.perf_counter() - t0, [r.output_token_ids for r in reqs]


def run_sequential(model, trace):
    """One request at a time, no batching: the latency-first single-request loop."""
    t0 = time.perf_counter()
    stats, outs = [], []
    for r in trace:
        s = RequestStats(arrival_time=t0, first_scheduled_time=time.perf_counter())
        outs.append(list(generate_tokens(model, r.prompt_token_ids, _params(r), metrics=s)))  # stamps tokens
        s.finish_time = s.token_times[-1]
        stats.append(s)
    return stats, time.perf_counter() - t0, outs


@torch.no_grad()
def run_transformers(hf, trace, pad_id: int):
    """HF generate on one left-padded batch of every request, until the longest is done."""
    from torch.nn.utils.rnn import pad_sequence

    from minfer.bench.peers import StepClock
    prompts = [torch.tensor(r.prompt_token_ids) for r in trace]
    ids = pad_sequence(prompts, batch_first=True, padding_value=pad_id, padding_side="left")      # (B, L)
    mask = pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True, padding_side="left")
    ids, mask, L = ids.to(hf.device), mask.to(hf.device), ids.shape[1]
    steps = max(r.max_tokens for r in trace)
    clock = StepClock()
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                      streamer=clock, pad_token_id=pad_id)
    duration = time.perf_counter() - t0
    times = clock.times[1:]                    # the first put() is the prompt
    # each request finishes at its last useful token (generous: not the batch's end)
    stats = [RequestStats(arrival_time=t0, num_prompt_tokens=len(r.prompt_token_ids), first_scheduled_time=t0,
                          token_times=times[:r.max_tokens], finish_time=times[r.max_tokens - 1])
             for r in trace]
    return stats, duration, [out[i, L:L + r.max_tokens].tolist() for i, r in enumerate(trace)]


def _panels(path: Path, title: str, draw) -> None:
    """Two plots side by side, drawn by ``draw(axes)``, with grid and legend, saved as ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    draw(axes)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distributions(results: dict, path: Path, title: str) -> None:
    """The TTFT and TPOT of each run as CDFs."""
    def draw(axes):
        for ax, metric in zip(axes, ("ttft", "tpot")):
            for name, stats in results.items():
                xs = sorted(1000 * getattr(s, metric) for s in stats if getattr(s, metric) is not None)
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.plot(xs, ys, label=name, drawstyle="steps-post")
            ax.set(xlabel=f"{metric.upper()} (ms)", ylabel="fraction of requests",
                   title=f"{metric.upper()} distribution (CDF)")
    _panels(path, title, draw)


def plot_sweep(sweep: list[dict], path: Path) -> None:
    """p99 TTFT and median TPOT against output throughput, one line per policy, points labelled by rate."""
    def draw(axes):
        labels = {"p99_ttft_ms": "p99 TTFT (ms)", "median_tpot_ms": "median TPOT (ms)"}
        for ax, (key, label) in zip(axes, labels.items()):
            for policy in sorted({row["policy"] for row in sweep}):
                rows = [r for r in sweep if r["policy"] == policy]
                xs = [r["output_throughput"] for r in rows]
                ax.plot(xs, [r[key] for r in rows], marker="o", label=policy)
                for r in rows:
                    ax.annotate(f"{r['rate']:g}/s", (r["output_throughput"], r[key]), fontsize=7)
            ax.set(xlabel="output throughput (tok/s)", ylabel=label, yscale="log")
    _panels(path, "throughput vs latency as the arrival rate rises", draw)


def _check(args) -> tuple[list[str], list[str], list[float], dict]:
    """The flags, checked before the model loads -> (policies, baselines, sweep rates, SLOs in ms)."""
    from minfer.devices import resolve_dtype
    from minfer.engine.scheduler import POLICIES
    from minfer.serving.router import POLICIES as ROUTER_POLICIES
    policies = names(args.policy, "--policy", POLICIES)
    baselines = names(args.baselines, "--baselines", BASELINES)
    names(args.routing or "", "--routing", ROUTER_POLICIES)
    if args.batch_invariant and resolve_dtype(args.dtype) != torch.bfloat16:
        raise ValueError(f"--batch-invariant runs the engine in bfloat16 (--dtype bfloat16), got {args.dtype}")
    if args.price_per_hour < 0 or args.watts < 0:
        raise ValueError("--price-per-hour and --watts must be >= 0")
    if args.url is not None:                     # before any model is loaded: is a server there?
        import httpx
        if not args.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {args.url!r}")
        try:
            httpx.get(f"{args.url.rstrip('/')}/v1/models", timeout=5)
        except (httpx.HTTPError, ValueError) as e:
            raise ValueError(f"--url {args.url}: no server answers there ({type(e).__name__})") from None
    sweep_rates = [float(x) for x in args.sweep_rates.split(",") if x.strip()]
    slo = {k: v for k, v in (("ttft", args.slo_ttft), ("tpot", args.slo_tpot)) if v is not None}
    return policies, baselines, sweep_rates, slo


def _offline(args, llm, trace, baselines: list[str], n_out: int, out_dir: Path) -> dict:
    """Offline throughput: every request at t = 0, the engine against the baselines, interleaved."""
    model, tok = llm.model, llm.tokenizer
    offline = [dataclasses.replace(r, arrival_time=0.0) for r in trace]
    runs = {"continuous": lambda: run_online(model, tok, args, "continuous", offline)}
    if "alone" in baselines:
        runs["alone"] = lambda: run_alone(model, tok, args, offline)
    if "sequential" in baselines:
        runs["sequential"] = lambda: run_sequential(model, offline)
    if "torch-decode" in baselines:   # what the C++ decode kernel buys: the engine on gather + SDPA
        runs["torch-decode"] = lambda: run_online(model, tok, args, "continuous", offline,
                                                  decode_kernel="torch")
    if "float32" in baselines:      # what --dtype buys: the same engine on the model in float32
        from minfer.loading import load_model
        m32 = load_model(args.model, device=llm.device, dtype="float32", prepack=None).model  # as LLM does
        runs["float32"] = lambda: run_online(m32, tok, args, "continuous", offline)
    if "transformers" in baselines:
        from minfer.bench.peers import hf_model
        hf = hf_model(llm.config, model.state_dict(), dtype=llm.dtype, device=llm.device)
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        runs["transformers"] = lambda: run_transformers(hf, offline, pad)

    def timed(fn):
        cpu0 = time.process_time()
        stats, duration, outs = fn()
        cpu = time.process_time() - cpu0          # CPU seconds: steadier than wall time on a busy machine
        return {"output_tok_s": n_out / duration, "seconds": duration,
                "output_tok_per_cpu_s": n_out / cpu, "cpu_seconds": cpu}, (stats, duration, outs)

    log("offline throughput (all requests at t = 0), interleaved:")
    results: dict = {}                              # name -> (RequestStats list, seconds, output tokens)
    med = interleaved({name: partial(timed, fn) for name, fn in runs.items()}, repeats=args.repeats, warmup=0,
                      log=log, outputs=results)
    rows = []
    for name, r in med.items():
        same = sum(a == b for a, b in zip(results[name][2], results["continuous"][2]))
        rows.append({"method": name, **r, "x_continuous": med["continuous"]["output_tok_s"] / r["output_tok_s"],
                     "x_continuous_cpu": med["continuous"]["output_tok_per_cpu_s"] / r["output_tok_per_cpu_s"],
                     "same_greedy": f"{same}/{len(trace)}"})
    print("\n== offline throughput: every request at t = 0 (medians of the interleaved rounds) ==")
    print(table(rows, TABLES["serve"][0][2] + [("cpu_seconds", "CPU s", "{:.1f}")]))
    offline_metrics = {name: summarize(st, duration=d) for name, (st, d, _) in results.items()}
    print("\n" + format_table(offline_metrics))
    plot_distributions({k: s for k, (s, _, _) in results.items()}, out_dir / "offline_ttft_tpot.png",
                       f"{len(trace)} requests at t = 0")
    return {"rows": rows, "metrics": {k: m.as_dict() for k, m in offline_metrics.items()}}


def _front_door(args, llm, trace, n_out: int) -> dict:
    """The front door: ``LLM.generate`` on the list vs one prompt per call."""
    from minfer.llm import LLM
    front = LLM.from_model(llm.model, llm.tokenizer, max_num_seqs=args.max_num_seqs,
                           block_size=args.block_size, kv_cache_memory_bytes=2 * 2**30,
                           max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
                           decode_kernel=args.decode_kernel)
    prompts, params = [r.prompt_token_ids for r in trace], [_params(r) for r in trace]

    def door(batched: bool):                        # every prompt in one call, or one call per prompt
        t0 = time.perf_counter()
        res = front.generate(prompts, params) if batched else [front.generate(p, sp)[0]
                                                               for p, sp in zip(prompts, params)]
        duration = time.perf_counter() - t0
        return {"output_tok_s": n_out / duration, "seconds": duration}, [o.token_ids for o in res]

    log("front door: LLM.generate(list) vs one prompt per call, interleaved:")
    outs: dict = {}
    runs = {"LLM.generate(list)": partial(door, True), "one prompt per call": partial(door, False)}
    med = interleaved(runs, repeats=args.repeats, warmup=0, log=log, outputs=outs)
    ratio = med["LLM.generate(list)"]["output_tok_s"] / med["one prompt per call"]["output_tok_s"]
    same = sum(a == b for a, b in zip(outs["LLM.generate(list)"], outs["one prompt per call"]))
    print("\n== the front door: LLM.generate on all prompts vs one prompt per call (medians) ==")
    print(table([{"name": k, **v} for k, v in med.items()], TABLES["serve"][1][2]))
    print(f"LLM.generate(list) is {ratio:.2f}x the output tok/s of one prompt per call; "
          f"greedy outputs identical: {same}/{len(trace)}")
    return {"rows": med, "ratio": ratio, "same_greedy": same, "requests": len(trace)}


def _at_rate(args, llm, trace, policies: list[str], rate: float, slo: dict, part: str) -> dict:
    """Each policy on ``trace`` (arriving at ``rate``) -> {policy: (RequestStats list, ServingMetrics)}."""
    out = {}
    for policy in policies:
        log(f"{part}: {policy} at {rate:g} req/s ...")
        stats, duration, _ = run_online(llm.model, llm.tokenizer, args, policy, trace)
        out[policy] = stats, summarize(stats, duration=duration, slo_ms=slo)
    return out


def _online(args, llm, trace, policies: list[str], slo: dict, out_dir: Path) -> dict:
    """Online serving: each scheduling policy on the trace at its arrival rate."""
    runs = _at_rate(args, llm, trace, policies, args.rate, slo, "online")
    print(f"\n== online: {len(trace)} requests arriving at {args.rate:g} req/s "
          f"(burstiness {args.burstiness:g}) ==")
    print(format_table({k: m for k, (_, m) in runs.items()}))
    plot_distributions({k: s for k, (s, _) in runs.items()}, out_dir / "online_ttft_tpot.png",
                       f"{len(trace)} requests at {args.rate:g} req/s")
    return {k: m.as_dict() for k, (_, m) in runs.items()}


def _sweep(args, llm, make_trace, policies: list[str], sweep_rates: list[float], slo: dict,
           out_dir: Path) -> list[dict]:
    """Throughput against latency as the arrival rate rises, for each policy."""
    sweep = []
    for rate in sweep_rates:
        for policy, (_, m) in _at_rate(args, llm, make_trace(rate), policies, rate, slo, "sweep").items():
            sweep.append({"policy": policy, "rate": rate, "output_throughput": m.output_throughput,
                          "p99_ttft_ms": m.ttft.p99, "median_tpot_ms": m.tpot.median, "goodput": m.goodput})
    print("\n== sweep ==")
    print(table(sweep, TABLES["serve"][3][2] + [("median_tpot_ms", "median TPOT ms", "{:.0f}")]))
    plot_sweep(sweep, out_dir / "sweep.png")
    return sweep


def main(args) -> int:
    from minfer.bench.machine import machine_line
    from minfer.llm import LLM
    from minfer.serving.workload import synthetic_trace, text_trace

    policies, baselines, sweep_rates, slo = _check(args)
    set_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_memory_bytes=2**27)  # its own pool unused
    model, tok = llm.model, llm.tokenizer

    def make_trace(rate):
        kw = dict(rate=rate, burstiness=args.burstiness, prompt_len=args.prompt_len, output_len=args.output_len,
                  seed=args.seed)
        if args.dataset == "text":
            return text_trace(tok, args.num_requests, **kw)
        return synthetic_trace(args.num_requests, vocab=(100, llm.config.vocab_size), **kw)

    trace = make_trace(args.rate)
    n_in = sum(len(r.prompt_token_ids) for r in trace)
    n_out = sum(r.max_tokens for r in trace)
    log(f"bench serve: {args.model} on {llm.device} ({llm.dtype}, {torch.get_num_threads()} threads); "
        f"{len(trace)} requests, {n_in} prompt + {n_out} output tokens; budget {args.max_num_batched_tokens} "
        f"tokens/step, max {args.max_num_seqs} running")
    log(machine_line(llm.device))
    log("warm-up ...")
    _engine(model, tok, args, "continuous").generate([trace[0].prompt_token_ids[:32]], _params(trace[0]))
    if args.routing:
        from minfer.bench.serve_route import main_routing
        name, payload = "serve_routing", {"benchmark": "serve --routing", "model": args.model,
                                          **main_routing(args, tok)}
    elif args.url:
        from minfer.bench.serve_http import main_http
        log(f"cost assumptions: ${args.price_per_hour:g} per hour, {args.watts:g} W "
            f"(defaults: a 2-vCPU cloud VM at $0.10/h; an H100 at 700 W)")
        res = main_http(args, llm, trace, slo, run_online)
        name, payload = "serve_http", {"benchmark": "serve --url", "model": args.model,
                                       "threads": torch.get_num_threads(), "rate": args.rate,
                                       "num_requests": len(trace), **res}
    else:
        name, payload = "serve", {"benchmark": "serve", "model": args.model, "device": str(llm.device),
                                  "dtype": str(llm.dtype), "threads": torch.get_num_threads(),
                                  "args": {k: v for k, v in vars(args).items() if k != "func"},
                                  "prompt_tokens": n_in, "output_tokens": n_out}
        if baselines:              # 1. offline throughput: everything at t = 0, one interleaved run
            payload["offline"] = _offline(args, llm, trace, baselines, n_out, out_dir)
        if args.front_door:        # 1b. the front door: LLM.generate on the list vs one prompt per call
            payload["front_door"] = _front_door(args, llm, trace, n_out)
        if policies and not (baselines and math.isinf(args.rate) and policies == ["continuous"]):
            payload["online"] = _online(args, llm, trace, policies, slo, out_dir)  # 2. each policy at --rate
        if sweep_rates:            # 3. throughput vs latency as the rate rises
            payload["sweep"] = _sweep(args, llm, make_trace, policies, sweep_rates, slo, out_dir)
    write_json(out_dir / f"{name}.json", payload)
    return 0
