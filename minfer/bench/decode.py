"""`minfer bench decode`: prefill and decode speed of the naive loop, the cached loop and transformers.

    naive        minfer/naive.py: the oracle, whole sequence recomputed per token, math attention
    no-cache     minfer's model, whole sequence recomputed per token (fused attention)
    cached       minfer's model with the contiguous KV cache: prefill once, then one token per step
    unfused      the same, on the same weights, with q/k/v and gate/up as separate matmuls (the
                 layout before fused projections, ``build_model(..., fuse_projections=False)``)
    packed       cached, with every linear run by oneDNN on weights reordered once (``LLM(prepack=True)``)
    transformers HF LlamaForCausalLM.generate on the same weights (greedy, its own KV cache)
    transformers-compiled
                 the same generate with cache_implementation="static" and the decode forward
                 torch.compile'd (peers.StaticCompiledHF); its first call, which compiles, is
                 timed on its own and reported beside the table, never inside the tok/s

All produce exactly --max-tokens greedy tokens from the same prompt (EOS ignored). A method that
cannot run on this machine (transformers-compiled without a working compiler, say) is left out with
a line saying why; the others still run.
"Bandwidth achieved" = (weight bytes + mean KV bytes read per decode step) x decode steps/s;
MBU (model-bandwidth utilisation) = that / the bandwidth measured on this machine in the same run.
"""
import argparse
import datetime
import statistics
import sys
import time

import torch

from minfer.bench.machine import machine_info, mbu, measure_bandwidth, measure_flops
from minfer.bench.timing import interleaved, table, write_json
from minfer.cli_args import add_model_args, positive_int

METHODS = ["naive", "no-cache", "cached", "static", "unfused", "packed", "llm", "llm-graphs", "llm-compile",
           "transformers", "transformers-compiled"]
PROMPT = ("The history of computing is a story of machines that got smaller, faster and cheaper. "
          "Write a long essay about it, starting with the abacus.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per run (default 256)")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--methods", default="naive,no-cache,cached,llm,transformers",
                   help="comma-separated subset of " + ",".join(METHODS) + " "
                        "(static = cached on the static contiguous cache, gpt-fast's fixed-shape step, a CUDA "
                        "graph on a GPU; llm = batch-1 decode through LLM.generate, i.e. the engine, eager; llm-graphs = "
                        "the same on the static decode step, CUDA graphs on a GPU, replay on a CPU; "
                        "llm-compile = the static step torch.compile'd, compile time reported apart; unfused = cached "
                        "with separate q/k/v and gate/up matmuls; packed = cached on oneDNN-prepacked "
                        "linears, minfer/kernels/onednn_linear.py; transformers-compiled = transformers "
                        "generate with its static cache and the decode step torch.compile'd, compile "
                        "time reported separately). cached:FMT / llm:FMT run a copy quantized to FMT, "
                        "e.g. cached:int8-a8,cached:q4_0-a8; cached:FMT:plain keeps an -a8 format's decoder "
                        "layers on their plain torch path instead of the fused C++ layer, cached:plain / "
                        "llm:plain those of float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peers", default="", help="other engines timed in the same rounds: llama.cpp "
                   "(llama-cpp-python on the model's GGUF, same thread count; left out, saying why, when missing)")
    p.add_argument("--peer-gguf", default=None, help="the GGUF file for llama.cpp (default: the model's own)")
    p.add_argument("--quantization", default=None,
                   help="weight-only format for the model (and for unfused: the same weights, quantized alike)")
    p.add_argument("--no-kv-quality", dest="kv_quality", action="store_false",
                   help="skip the int8/fp8 KV-cache quality check (logit error, greedy agreement)")
    p.add_argument("--json", nargs="?", const="bench_results/decode.json", default=None,
                   help="also write the results as JSON (default path bench_results/decode.json)")


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every matrix once; the embedding only as the LM head."""
    if getattr(model, "quantization", None):
        from minfer.bench.quant import decode_weight_bytes
        return decode_weight_bytes(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    if not model.cfg.tie_word_embeddings:       # untied: the embedding table is only indexed (1 row)
        total -= emb.numel() * emb.element_size()
    return total


def _unfused_model(llm, args):
    """The same weights with separate q/k/v and gate/up linears (the layout before fusion), quantized
    alike when asked: rows are quantized one by one, so both hold the same quantized values."""
    from minfer.checkpoints import load_checkpoint
    from minfer.model import build_model
    from minfer.quant.apply import quantize_model
    if args.quantization is None:
        return build_model(llm.config, llm.model.state_dict(), device=llm.device, dtype=llm.dtype,
                           fuse_projections=False)
    cfg, state_dict, _ = load_checkpoint(args.model, dtype=llm.dtype, device="cpu")
    model = build_model(cfg, state_dict, device=llm.device, dtype=llm.dtype, fuse_projections=False)
    return quantize_model(model, args.quantization)


def _packed_model(llm):
    """The same weights, every linear run by oneDNN on a weight reordered once (a second copy)."""
    from minfer.kernels.onednn_linear import pack_linears
    from minfer.model import build_model
    if llm.device.type != "cpu" or llm.dtype != torch.float32 or getattr(llm.model, "quantization", None):
        raise ValueError("the packed method is for float32 weights on the CPU")
    model = build_model(llm.config, llm.model.state_dict(), device=llm.device, dtype=llm.dtype)
    pack_linears(model)
    return model


def _time_cached(model, prompt_ids, n, kv_cache):
    from minfer.metrics import RequestStats
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    m = RequestStats(arrival_time=time.perf_counter())
    toks = list(generate_tokens(model, prompt_ids, params, kv_cache=kv_cache, metrics=m))
    m.finish_time = m.token_times[-1]
    return {"ttft": m.ttft, "decode_tps": 1.0 / m.tpot, "tokens": toks}


def _time_llm(llm, prompt_ids, n):
    """Batch-1 decode through the front door: LLM.generate -> engine -> runner -> paged cache."""
    from minfer.sampling import SamplingParams
    out = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    return {"ttft": out.metrics.ttft, "decode_tps": 1.0 / out.metrics.tpot, "tokens": out.token_ids}


def _time_naive(model, prompt_ids, n):
    from minfer.naive import naive_forward
    weights, cfg = model.state_dict(), model.cfg
    ids = list(prompt_ids)
    t0 = time.perf_counter()
    times = []
    for _ in range(n):
        ids.append(int(naive_forward(weights, cfg, ids)[-1].argmax()))
        times.append(time.perf_counter())
    return {"ttft": times[0] - t0, "decode_tps": (n - 1) / (times[-1] - times[0]), "tokens": ids[len(prompt_ids):]}


@torch.no_grad()
def teacher_forced_logits(model, prompt_ids: list[int], tokens: list[int], kind: str = "contiguous"):
    """Feed prompt + ``tokens`` one decode step at a time -> (logits that predict each of ``tokens``
    (n, vocab), the cache's bytes): a model's choices along another run's path."""
    from minfer.kv import make_cache
    device, dtype = model.inv_freq.device, model.model.embed_tokens.weight.dtype
    seq = torch.tensor([prompt_ids + tokens[:-1]], device=device)
    pos = torch.arange(seq.shape[1], device=device)[None]
    P = len(prompt_ids)
    cache = make_cache(kind, model.cfg, 1, seq.shape[1], dtype=dtype, device=device)
    out = [model(seq[:, :P], pos[:, :P], kv_cache=cache, last_only=True)[0, -1]]
    for t in range(P, seq.shape[1]):
        out.append(model(seq[:, t:t + 1], pos[:, t:t + 1], kv_cache=cache)[0, -1])
    return torch.stack(out), cache.nbytes()


def _agreement(engines: dict, outputs: dict, rows: list[dict], prompt_ids: list[int]) -> None:
    """Each quantized method against cached's greedy tokens, teacher-forced: how often its argmax picks
    cached's next token (one divergence cannot end the count, as it ends the free-running prefix)."""
    for row in rows:
        e = engines.get(row["method"])
        if ":" in row["method"] and "cached" in outputs:
            model = e.model if row["method"].startswith("llm") else e
            logits, _ = teacher_forced_logits(model, prompt_ids, outputs["cached"])
            want = torch.tensor(outputs["cached"], device=logits.device)
            row["teacher_forced_top1"] = (logits.argmax(-1) == want).float().mean().item()


def kv_quant_quality(model, prompt_ids, n, fmts=("int8", "fp8")) -> list[dict]:
    """Quantized KV cache vs the fp32 cache over `n` greedy tokens.

    teacher-forced: feed the fp32 run's tokens through each cache and compare the logits at every
    step (max abs error, and how often the argmax agrees); free-running: generate greedily with the
    quantized cache and count the positions where its tokens equal the fp32 run's.
    """
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    ref_tokens = list(generate_tokens(model, prompt_ids, params, kv_cache="contiguous"))
    ref_logits, ref_bytes = teacher_forced_logits(model, prompt_ids, ref_tokens, "contiguous")
    rows = []
    for fmt in fmts:
        logits, nbytes = teacher_forced_logits(model, prompt_ids, ref_tokens, fmt)
        free = list(generate_tokens(model, prompt_ids, params, kv_cache=fmt))
        same = sum(a == b for a, b in zip(free, ref_tokens))
        first_diff = next((i for i, (a, b) in enumerate(zip(free, ref_tokens)) if a != b), None)
        rows.append({
            "format": fmt, "cache_bytes_ratio": nbytes / ref_bytes,
            "max_logit_error": (logits - ref_logits).abs().max().item(),
            "mean_logit_error": (logits - ref_logits).abs().mean().item(),
            "teacher_forced_top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "free_running_token_agreement": same / n,
            "first_divergence": first_diff,
        })
    return rows


def _compiled_peer(cfg, model, llm, prompt_ids, n, log):
    """transformers' static cache + compiled decode on its own copy of the weights, warmed up
    (compiled) now -> (peer, None); or (None, why) when it cannot run here."""
    from minfer.bench.peers import StaticCompiledHF, hf_model
    log("transformers-compiled: first generate, which compiles the decode step (not timed as decode) ...")
    try:
        peer = StaticCompiledHF(hf_model(cfg, model.state_dict(), dtype=llm.dtype, device=llm.device))
        peer.warm_up(prompt_ids, n)
    except RuntimeError as e:
        return None, str(e)
    log(f"  compiled: first generate took {peer.warmup_s:.1f} s")
    return peer, None


def _methods(args) -> list[str]:
    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be >= 2 to measure decode speed")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m.partition(":")[0] not in METHODS
                   or (":" in m and m.partition(":")[0] not in ("cached", "llm"))]:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS} (cached:FMT, llm:FMT quantized)")
    from minfer.quant.apply import parse_spec
    for m in methods:
        if fmt := _format(m):
            parse_spec(fmt)                                         # a bad name: ValueError naming the choices
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := [p for p in peers if p != "llama.cpp"]:
        raise ValueError(f"unknown peer(s) {unknown} for --peers; choose llama.cpp")
    return methods + peers


def _runners(args, llm, methods: list[str], prompt_ids: list[int], log):
    """Build what each method times -> (name -> timing function, engines, compiled peer, cannot_run).
    A method that cannot run here is dropped from ``methods``, with its reason in ``cannot_run``."""
    from minfer.bench.peers import hf_generate_timed, hf_model
    from minfer.llm import LLM
    model, cfg, n = llm.model, llm.config, args.max_tokens
    hf = hf_model(cfg, model.state_dict(), dtype=llm.dtype, device=llm.device) if "transformers" in methods else None
    unfused = _unfused_model(llm, args) if "unfused" in methods else None
    packed = _packed_model(llm) if "packed" in methods else None
    engines = {"llm": llm}
    for name, kw in (("llm-graphs", {}), ("llm-compile", {"compile": True})):
        if name in methods:                  # one bucket, a static width just past this run's context
            log(f"{name}: building the static decode step ...")
            engines[name] = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                                enforce_eager=False, max_num_seqs=1,
                                max_seq_len_to_capture=len(prompt_ids) + n + 16, **kw)
    compiled, cannot_run = None, {}
    quantized = {m: _quantized_copy(args, llm, m) for m in methods if ":" in m}
    llama = _llama_peer(args, prompt_ids, n, cannot_run, methods) if "llama.cpp" in methods else None
    engines.update(quantized, **({"llama.cpp": llama} if llama else {}))
    if "transformers-compiled" in methods:
        compiled, why = _compiled_peer(cfg, model, llm, prompt_ids, n, log)
        if compiled is None:
            cannot_run["transformers-compiled"] = why
            methods.remove("transformers-compiled")
            print(f"transformers-compiled cannot run here, left out: {why}", flush=True)
    if not methods:
        raise ValueError(f"no method left to run: {cannot_run}")
    fns = {
        "naive": lambda: _time_naive(model, prompt_ids, n),
        "no-cache": lambda: _time_cached(model, prompt_ids, n, "none"),
        "cached": lambda: _time_cached(model, prompt_ids, n, "contiguous"),
        "static": lambda: _time_cached(model, prompt_ids, n, "static"),
        "unfused": lambda: _time_cached(unfused, prompt_ids, n, "contiguous"),
        "packed": lambda: _time_cached(packed, prompt_ids, n, "contiguous"),
        "llm": lambda: _time_llm(llm, prompt_ids, n),
        "llm-graphs": lambda: _time_llm(engines["llm-graphs"], prompt_ids, n),
        "llm-compile": lambda: _time_llm(engines["llm-compile"], prompt_ids, n),
        "transformers": lambda: hf_generate_timed(hf, prompt_ids, n),
        "transformers-compiled": lambda: compiled.timed(prompt_ids, n),
        "llama.cpp": lambda: llama.timed(prompt_ids, n),
    }
    for m, copy in quantized.items():
        fns[m] = (lambda c=copy: _time_llm(c, prompt_ids, n)) if m.startswith("llm") else \
            (lambda c=copy: _time_cached(c, prompt_ids, n, "contiguous"))
    return fns, engines, compiled, cannot_run


def _format(method: str) -> str:
    return method.partition(":")[2].removesuffix("plain").removesuffix(":")       # "" for float32


def _quantized_copy(args, llm, method: str):
    """cached:FMT -> a model quantized to FMT; llm:FMT -> an engine on such a model (cached:plain and
    llm:plain: float32 copies with the fused layer off)."""
    from minfer.llm import LLM
    from minfer.model import build_model
    from minfer.quant.apply import quantize_model
    from minfer.kernels.cpu_fused_layer import prepare_fused_layers
    fmt = _format(method) or None
    if method.startswith("llm"):
        e = LLM(args.model, device=args.device, dtype=args.dtype, quantization=fmt, enforce_eager=True)
    else:
        e = build_model(llm.config, llm.model.state_dict(), device=llm.device, dtype=llm.dtype)
        e = quantize_model(e, fmt) if fmt else e
    if method.endswith(":plain"):
        prepare_fused_layers(e.model if method.startswith("llm") else e, enabled=False)
    return e


def _llama_peer(args, prompt_ids, n, cannot_run: dict, methods: list[str]):
    """llama.cpp on the model's GGUF, or None (removed from ``methods``, the reason in ``cannot_run``)."""
    from minfer.bench.peers import LlamaCppPeer, find_gguf
    gguf = args.peer_gguf or find_gguf(args.model)
    try:
        if gguf is None:
            raise RuntimeError(f"no GGUF file for {args.model} (give one with --peer-gguf)")
        return LlamaCppPeer(gguf, torch.get_num_threads(), len(prompt_ids) + n + 16)
    except (RuntimeError, ValueError) as e:
        cannot_run["llama.cpp"] = str(e)
        methods.remove("llama.cpp")
        print(f"llama.cpp cannot run here, left out: {e}", flush=True)
        return None


def _weight_bytes(engines: dict, model) -> dict:
    """Weight bytes per decode step of each method whose weights differ from the model's
    (a quantized copy; llama.cpp: its GGUF file's size, which its tied head reads whole)."""
    out = {}
    for name, e in engines.items():
        if name == "llama.cpp":
            out[name] = e.gguf.stat().st_size
        elif ":" in name:
            out[name] = weight_bytes_per_step(e.model if name.startswith("llm") else e)
    return out


def _rows(medians: dict, outputs: dict, wbytes: dict, kv_mean: float, bw: float) -> list[dict]:
    """One table row per method: speed, speed-up over naive, bandwidth used, same tokens as cached,
    and the speed over llama.cpp's when it ran. ``wbytes``: method -> weight bytes ("*": the rest)."""
    base = medians.get("naive") or next(iter(medians.values()))
    peer = medians.get("llama.cpp")
    rows = []
    for name, r in medians.items():
        row = {"method": name, **r, "tpot_ms": 1000.0 / r["decode_tps"],
               "speedup_vs_naive": r["decode_tps"] / base["decode_tps"] if "naive" in medians else None,
               "x_llama_cpp": r["decode_tps"] / peer["decode_tps"] if peer else None}
        if name != "naive" and name != "no-cache":
            w = wbytes.get(name, wbytes["*"])
            row["bandwidth_gbs"] = (w + kv_mean) * r["decode_tps"] / 1e9
            row["bandwidth_fraction"] = mbu(w + kv_mean, r["decode_tps"], bw)
        if name != "cached" and "cached" in outputs:
            row["same_tokens_as_cached"] = outputs[name] == outputs["cached"]
            row["free_running_prefix"] = next((i for i, (a, b) in enumerate(zip(outputs[name], outputs["cached"]))
                                               if a != b), len(outputs["cached"]))
        rows.append(row)
    return rows


def _compile_report(compiled, medians: dict, n: int) -> dict | None:
    if compiled is None:
        return None
    r = medians["transformers-compiled"]
    run_s = r["ttft"] + (n - 1) / r["decode_tps"]          # one timed generate, wall clock
    report = {"first_call_s": compiled.warmup_s, "timed_call_s": run_s, "compile_s": compiled.warmup_s - run_s}
    print(f"transformers-compiled: first generate (compiles the decode step) {compiled.warmup_s:.1f} s, "
          f"a timed generate {run_s:.2f} s, so compiling cost about {report['compile_s']:.1f} s; "
          f"the first call is not in the table")
    if "cached" in medians:
        print(f"cached / transformers-compiled decode tok/s = "
              f"{medians['cached']['decode_tps'] / r['decode_tps']:.2f}x")
    return report


def _print_ratios(medians: dict, per_round: dict, engines: dict, rows: list[dict]) -> None:
    """The pairwise comparisons each method exists for (fused vs unfused, packed vs not, ...)."""
    if "cached" in medians and "unfused" in medians:
        ratios = [a / b for a, b in zip(per_round["cached"], per_round["unfused"])]
        print(f"fused projections: cached (fused) / unfused decode tok/s = "
              f"{medians['cached']['decode_tps'] / medians['unfused']['decode_tps']:.3f} (ratio of medians); "
              f"per round {' '.join(f'{r:.3f}' for r in ratios)}, median {statistics.median(ratios):.3f}")
    if "cached" in medians and "packed" in medians:
        ratios = [a / b for a, b in zip(per_round["packed"], per_round["cached"])]
        print(f"prepacked linears: packed / cached decode tok/s = "
              f"{medians['packed']['decode_tps'] / medians['cached']['decode_tps']:.3f} (ratio of medians); "
              f"per round {' '.join(f'{r:.3f}' for r in ratios)}")
    for name in ("llm-graphs", "llm-compile"):
        if name in medians and "llm" in medians:
            e = engines[name]
            print(f"{name} / llm (eager) decode tok/s = {medians[name]['decode_tps'] / medians['llm']['decode_tps']:.3f}; "
                  f"start-up: compile {e.compile_seconds:.1f} s, graph capture {e.capture_seconds:.1f} s "
                  f"(not in the table)")
    for plain in [m for m in medians if m.endswith(":plain") and m.removesuffix(":plain") in medians]:
        ratios = [a / b for a, b in zip(per_round[plain.removesuffix(":plain")], per_round[plain])]
        print(f"fused C++ layer: {plain.removesuffix(':plain')} / {plain} decode tok/s = "
              f"{statistics.median(ratios):.3f} (median of rounds: {' '.join(f'{r:.3f}' for r in ratios)})")
    if "cached" in medians and "static" in medians:
        print(f"static / cached decode tok/s (the single-request loop on fixed shapes) = "
              f"{medians['static']['decode_tps'] / medians['cached']['decode_tps']:.3f}")
    if "cached" in medians and "llm" in medians:
        print(f"LLM (engine, batch 1) / cached generate_tokens decode tok/s = "
              f"{medians['llm']['decode_tps'] / medians['cached']['decode_tps']:.3f}")
    for row in rows:
        if "same_tokens_as_cached" in row:
            print(f"{row['method']} greedy tokens identical to cached: {row['same_tokens_as_cached']}")


def _kv_quality(model, prompt_ids: list[int], n: int, log) -> list[dict]:
    log(f"KV-cache quantization quality over {n} greedy tokens ...")
    kv_rows = kv_quant_quality(model, prompt_ids, n)
    print(f"\nKV cache quantization vs the fp32 cache, {n} greedy tokens:")
    print(table(kv_rows, [("format", "format", "{:>6}"), ("cache_bytes_ratio", "bytes vs fp32", "{:.3f}"),
                          ("max_logit_error", "max |dlogit|", "{:.3f}"),
                          ("mean_logit_error", "mean |dlogit|", "{:.4f}"),
                          ("teacher_forced_top1_agreement", "top-1 agree (forced)", "{:.1%}"),
                          ("free_running_token_agreement", "tokens agree (free)", "{:.1%}"),
                          ("first_divergence", "first diverging token", "{}")]))
    return kv_rows


def main(args) -> int:
    from minfer.kv import kv_cache_bytes
    from minfer.llm import LLM

    methods = _methods(args)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization, enforce_eager=True)
    model, cfg = llm.model, llm.config
    prompt_ids = llm.tokenizer.encode(PROMPT)
    n = args.max_tokens
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    fns, engines, compiled, cannot_run = _runners(args, llm, methods, prompt_ids, log)
    outputs, per_round = {}, {}

    def wrap(name):
        def run():
            res = fns[name]()
            outputs[name] = res.pop("tokens")
            per_round.setdefault(name, []).append(res["decode_tps"])
            return res
        return run

    log(f"bench decode: {args.model}, {len(prompt_ids)} prompt tokens, {n} new tokens, "
        f"device {llm.device}, {llm.dtype}, weights {args.quantization or 'float'}, {args.repeats} interleaved rounds")
    log("measuring memory bandwidth and matmul FLOP/s ...")
    bw = measure_bandwidth(llm.device)
    flops = measure_flops(llm.device)
    medians = interleaved({m: wrap(m) for m in methods}, repeats=args.repeats, warmup=0, log=log)

    wbytes = weight_bytes_per_step(model)
    kv_mean = kv_cache_bytes(cfg, len(prompt_ids) + n / 2, model.model.embed_tokens.weight.element_size())
    rows = _rows(medians, outputs, {"*": wbytes, **_weight_bytes(engines, model)}, kv_mean, bw)
    _agreement(engines, outputs, rows, prompt_ids)
    ratio = (medians["cached"]["decode_tps"] / medians["transformers"]["decode_tps"]
             if "cached" in medians and "transformers" in medians else None)
    print(table(rows, [("method", "method", "{:>12}"), ("decode_tps", "decode tok/s", "{:.2f}"),
                       ("ttft", "TTFT s", "{:.3f}"), ("tpot_ms", "TPOT ms", "{:.1f}"),
                       ("speedup_vs_naive", "x naive", "{:.1f}"), ("x_llama_cpp", "x llama.cpp", "{:.2f}"),
                       ("bandwidth_gbs", "GB/s", "{:.2f}"),
                       ("bandwidth_fraction", "MBU", "{:.0%}"),
                       ("teacher_forced_top1", "top-1 = cached (forced)", "{:.1%}"),
                       ("free_running_prefix", "same prefix (free)", "{}")]))
    mi = machine_info(llm.device)
    print(f"\nmachine: {mi['processor']}, {mi['cpu_count']} CPUs, {mi['torch_threads']} torch threads, "
          f"torch {mi['torch']}, {llm.device}, {llm.dtype}")
    print(f"measured read bandwidth {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.0f} GFLOP/s; "
          f"weights read per decode step {wbytes / 1e6:.0f} MB, mean KV read {kv_mean / 1e6:.1f} MB")
    if ratio is not None:
        print(f"cached / transformers decode tok/s = {ratio:.2f}x")
    compile_report = _compile_report(compiled, medians, n)
    for name, why in cannot_run.items():
        print(f"{name}: not run ({why})")
    if "llama.cpp" in engines:
        print(f"llama.cpp: llama-cpp-python on {engines['llama.cpp'].gguf}, {torch.get_num_threads()} threads")
    _print_ratios(medians, per_round, engines, rows)
    if any("teacher_forced_top1" in r for r in rows):
        print(f"top-1 = cached (forced): fed cached's {n} greedy tokens, how often a quantized method's argmax "
              f"picks the same next one; same prefix (free): its own greedy tokens equal to cached's before the first "
              f"difference (cached: weights {args.quantization or 'float'}, {llm.dtype})")
    kv_rows = _kv_quality(model, prompt_ids, n, log) if args.kv_quality else None
    if args.json:
        write_json(args.json, {"kv_quantization": kv_rows,
            "benchmark": "decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": mi, "model": args.model, "dtype": str(llm.dtype),
            "quantization": args.quantization,
            "prompt_tokens": len(prompt_ids), "new_tokens": n, "repeats": args.repeats,
            "measured_bandwidth_gbs": bw / 1e9, "measured_gflops": flops / 1e9,
            "weight_bytes_per_step": wbytes, "results": rows, "cached_over_transformers": ratio,
            "transformers_compiled_compile": compile_report, "not_run": cannot_run,
        })
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
