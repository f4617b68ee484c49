"""`minfer bench decode`: prefill and decode speed of the naive loop, the cached loop and transformers.

Every method produces exactly --max-tokens greedy tokens from the same prompt (EOS ignored); one that
cannot run here is left out with a line saying why. The methods, and MBU: docs/measuring.md.
"""
import argparse
import statistics
import time
from functools import partial

import torch

from minfer.bench.machine import machine_info, machine_line, mbu, measure_bandwidth, measure_flops
from minfer.bench.quant import PROMPT, decode_weight_bytes as weight_bytes_per_step
from minfer.bench.timing import (add_run_args, interleaved, log, names, rates, table, timed_generate,
                                 write_json)
from minfer.cli_args import add_model_args, set_threads
from minfer.sampling import SamplingParams

METHODS = ["naive", "no-cache", "cached", "static", "unfused", "packed", "llm", "llm-graphs", "llm-compile",
           "transformers", "transformers-compiled"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per run (default 256)")
    p.add_argument("--methods", default="naive,no-cache,cached,llm,transformers",
                   help="comma-separated subset of " + ",".join(METHODS) + " (each: docs/measuring.md). "
                        "cached:FMT / llm:FMT run a copy quantized to FMT, e.g. cached:int8-a8; "
                        "cached:FMT:plain keeps an -a8 format's decoder layers on their plain torch path "
                        "instead of the fused C++ layer, cached:plain / llm:plain those of float32")
    p.add_argument("--peers", default="", help="other engines timed in the same rounds: llama.cpp "
                   "(llama-cpp-python on the model's GGUF, same thread count; left out, saying why, when missing)")
    p.add_argument("--peer-gguf", default=None, help="the GGUF file for llama.cpp (default: the model's own)")
    p.add_argument("--quantization", default=None,
                   help="weight-only format for the model (and for unfused: the same weights, quantized alike)")
    p.add_argument("--no-kv-quality", dest="kv_quality", action="store_false",
                   help="skip the int8/fp8 KV-cache quality check (logit error, greedy agreement)")
    add_run_args(p, "decode", repeats=3)


def _unfused_model(llm, args):
    """The same weights with separate q/k/v and gate/up linears (the layout before fusion), quantized
    alike when asked: rows are quantized one by one, so both hold the same quantized values."""
    from minfer.checkpoints import load_checkpoint
    from minfer.model import build_model
    from minfer.quant.apply import quantize_model
    cfg, state_dict = llm.config, llm.model.state_dict()
    if args.quantization is not None:                 # the float weights, to quantize as the model's were
        cfg, state_dict, _ = load_checkpoint(args.model, dtype=llm.dtype, device="cpu")
    model = build_model(cfg, state_dict, device=llm.device, dtype=llm.dtype, fuse_projections=False)
    return model if args.quantization is None else quantize_model(model, args.quantization)


def _packed_model(llm):
    """The same weights, every linear run by oneDNN on a weight reordered once (a second copy)."""
    from minfer.kernels.onednn_linear import pack_linears
    from minfer.model import build_model
    if llm.device.type != "cpu" or llm.dtype != torch.float32 or getattr(llm.model, "quantization", None):
        raise ValueError("the packed method is for float32 weights on the CPU")
    model = build_model(llm.config, llm.model.state_dict(), device=llm.device, dtype=llm.dtype)
    pack_linears(model)
    return model


def _a8_kernel() -> str:
    """Which integer dot product the -a8 methods ran on, or why they ran their plain reference."""
    from minfer.kernels import cpu_quant_linear
    why = cpu_quant_linear.why_unavailable()
    return f"the plain-torch reference ({why})" if why else cpu_quant_linear.isa()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _time_llm(llm, prompt_ids, n):
    """Batch-1 decode through the front door: LLM.generate -> engine -> runner -> paged cache."""
    out = llm.generate(prompt_ids, _greedy(n))[0]
    return {"ttft": out.metrics.ttft, "decode_tps": 1.0 / out.metrics.tpot}, out.token_ids


def _time_naive(model, prompt_ids, n):
    from minfer.naive import naive_forward
    weights, cfg = model.state_dict(), model.cfg
    ids, times, t0 = list(prompt_ids), [], time.perf_counter()
    for _ in range(n):
        ids.append(int(naive_forward(weights, cfg, ids)[-1].argmax()))
        times.append(time.perf_counter())
    return rates(t0, times), ids[len(prompt_ids):]


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


def _agreement(quantized: dict, outputs: dict, rows: list[dict], prompt_ids: list[int]) -> None:
    """Each quantized method (name -> model) vs cached's greedy tokens, teacher-forced: how often its argmax
    picks cached's next token (one divergence cannot end the count, as it ends the free-running prefix)."""
    for row in rows:
        if row["method"] in quantized and "cached" in outputs:
            logits, _ = teacher_forced_logits(quantized[row["method"]], prompt_ids, outputs["cached"])
            want = torch.tensor(outputs["cached"], device=logits.device)
            row["teacher_forced_top1"] = (logits.argmax(-1) == want).float().mean().item()


def kv_quant_quality(model, prompt_ids, n, fmts=("int8", "fp8")) -> list[dict]:
    """Quantized KV cache vs the fp32 cache over `n` greedy tokens, printed as a table.

    teacher-forced: feed the fp32 run's tokens through each cache and compare the logits at every
    step (max abs error, and how often the argmax agrees); free-running: generate greedily with the
    quantized cache and count the positions where its tokens equal the fp32 run's.
    """
    from minfer.generate import generate_tokens
    log(f"KV-cache quantization quality over {n} greedy tokens ...")
    params = _greedy(n)
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
    print(f"\nKV cache quantization vs the fp32 cache, {n} greedy tokens:")
    print(table(rows, [("format", "format", "{:>6}"), ("cache_bytes_ratio", "bytes vs fp32", "{:.3f}"),
                       ("max_logit_error", "max |dlogit|", "{:.3f}"),
                       ("mean_logit_error", "mean |dlogit|", "{:.4f}"),
                       ("teacher_forced_top1_agreement", "top-1 agree (forced)", "{:.1%}"),
                       ("free_running_token_agreement", "tokens agree (free)", "{:.1%}"),
                       ("first_divergence", "first diverging token", "{}")]))
    return rows


def _compiled_peer(cfg, model, llm, prompt_ids, n):
    """transformers' static cache + compiled decode on its own copy of the weights, warmed up (compiled)
    now; RuntimeError when it cannot run here."""
    from minfer.bench.peers import StaticCompiledHF, hf_model
    log("transformers-compiled: first generate, which compiles the decode step (not timed as decode) ...")
    peer = StaticCompiledHF(hf_model(cfg, model.state_dict(), dtype=llm.dtype, device=llm.device))
    peer.warm_up(prompt_ids, n)
    log(f"  compiled: first generate took {peer.warmup_s:.1f} s")
    return peer


def _methods(args) -> list[str]:
    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be >= 2 to measure decode speed")
    set_threads(args.threads)
    methods = names(args.methods, "--methods")
    if unknown := [m for m in methods if m.partition(":")[0] not in METHODS
                   or (":" in m and m.partition(":")[0] not in ("cached", "llm"))]:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS} (cached:FMT, llm:FMT quantized)")
    from minfer.quant.apply import parse_spec
    for m in methods:
        if fmt := _format(m):
            parse_spec(fmt)                                         # a bad name: ValueError naming the choices
    return methods + names(args.peers, "--peers", ["llama.cpp"])


def _runners(args, llm, methods: list[str], prompt_ids: list[int]):
    """Build what each method times -> (name -> timing function, engines, peers, cannot_run): ``engines``
    maps each minfer method to the LLM or the model it runs, ``peers`` each other engine to its runner.
    A method that cannot run here is dropped from ``methods``, with its reason in ``cannot_run``."""
    from minfer.bench.peers import hf_generate_timed, hf_model
    from minfer.llm import LLM
    model, cfg, n = llm.model, llm.config, args.max_tokens
    engines = {"naive": model, "no-cache": model, "cached": model, "static": model, "llm": llm}
    if "unfused" in methods:
        engines["unfused"] = _unfused_model(llm, args)
    if "packed" in methods:
        engines["packed"] = _packed_model(llm)
    for name, kw in (("llm-graphs", {}), ("llm-compile", {"compile": True})):
        if name in methods:                  # one bucket, a static width just past this run's context
            log(f"{name}: building the static decode step ...")
            engines[name] = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                                enforce_eager=False, max_num_seqs=1,
                                max_seq_len_to_capture=len(prompt_ids) + n + 16, **kw)
    engines.update({m: _quantized_copy(args, llm, m) for m in methods if ":" in m})
    peers, cannot_run = {}, {}
    makers = {"transformers": partial(hf_model, cfg, model.state_dict(), dtype=llm.dtype, device=llm.device),
              "llama.cpp": partial(_llama_peer, args, prompt_ids, n),
              "transformers-compiled": partial(_compiled_peer, cfg, model, llm, prompt_ids, n)}
    for name, make in makers.items():
        if name in methods:
            try:
                peers[name] = make()
            except (RuntimeError, ValueError) as e:
                cannot_run[name] = str(e)
                methods.remove(name)
                print(f"{name} cannot run here, left out: {e}", flush=True)
    if not methods:
        raise ValueError(f"no method left to run: {cannot_run}")
    kv = {"no-cache": "none", "static": "static"}           # the cache each model method decodes with
    fns = {}
    for m in methods:
        if m == "naive":
            fns[m] = partial(_time_naive, model, prompt_ids, n)
        elif m == "transformers":
            fns[m] = partial(hf_generate_timed, peers[m], prompt_ids, n)
        elif m in peers:
            fns[m] = partial(peers[m].timed, prompt_ids, n)
        elif isinstance(engines[m], LLM):
            fns[m] = partial(_time_llm, engines[m], prompt_ids, n)
        else:
            fns[m] = partial(timed_generate, engines[m], prompt_ids, _greedy(n),
                             kv_cache=kv.get(m, "contiguous"))
    return fns, engines, peers, cannot_run


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


def _llama_peer(args, prompt_ids, n):
    """llama.cpp on the model's GGUF; RuntimeError when it cannot run here."""
    from minfer.bench.peers import LlamaCppPeer, find_gguf
    gguf = args.peer_gguf or find_gguf(args.model)
    if gguf is None:
        raise RuntimeError(f"no GGUF file for {args.model} (give one with --peer-gguf)")
    return LlamaCppPeer(gguf, torch.get_num_threads(), len(prompt_ids) + n + 16)


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


def _ratio(medians: dict, a: str, b: str) -> float | None:
    """a's decode tok/s over b's; None unless both ran."""
    return medians[a]["decode_tps"] / medians[b]["decode_tps"] if a in medians and b in medians else None


def _compile_report(compiled, medians: dict, n: int) -> dict | None:
    if compiled is None:
        return None
    r = medians["transformers-compiled"]
    run_s = r["ttft"] + (n - 1) / r["decode_tps"]          # one timed generate, wall clock
    report = {"first_call_s": compiled.warmup_s, "timed_call_s": run_s, "compile_s": compiled.warmup_s - run_s}
    print(f"transformers-compiled: first generate (compiles the decode step) {compiled.warmup_s:.1f} s, "
          f"a timed generate {run_s:.2f} s, so compiling cost about {report['compile_s']:.1f} s; "
          f"the first call is not in the table")
    if (x := _ratio(medians, "cached", "transformers-compiled")) is not None:
        print(f"cached / transformers-compiled decode tok/s = {x:.2f}x")
    return report


def _print_ratios(medians: dict, per_round: dict, engines: dict, rows: list[dict]) -> None:
    """The pairwise comparisons each method exists for (fused vs unfused, packed vs not, ...)."""
    def rounds(a: str, b: str) -> tuple[list[float], str]:
        ratios = [x["decode_tps"] / y["decode_tps"] for x, y in zip(per_round[a], per_round[b])]
        return ratios, " ".join(f"{r:.3f}" for r in ratios)

    if (r := _ratio(medians, "cached", "unfused")) is not None:
        ratios, text = rounds("cached", "unfused")
        print(f"fused projections: cached (fused) / unfused decode tok/s = {r:.3f} (ratio of medians); "
              f"per round {text}, median {statistics.median(ratios):.3f}")
    if (r := _ratio(medians, "packed", "cached")) is not None:
        print(f"prepacked linears: packed / cached decode tok/s = {r:.3f} (ratio of medians); "
              f"per round {rounds('packed', 'cached')[1]}")
    for name in ("llm-graphs", "llm-compile"):
        if (r := _ratio(medians, name, "llm")) is not None:
            e = engines[name]
            print(f"{name} / llm (eager) decode tok/s = {r:.3f}; start-up: compile {e.compile_seconds:.1f} "
                  f"s, graph capture {e.capture_seconds:.1f} s (not in the table)")
    for plain in [m for m in medians if m.endswith(":plain") and m.removesuffix(":plain") in medians]:
        ratios, text = rounds(plain.removesuffix(":plain"), plain)
        print(f"fused C++ layer: {plain.removesuffix(':plain')} / {plain} decode tok/s = "
              f"{statistics.median(ratios):.3f} (median of rounds: {text})")
    if (r := _ratio(medians, "static", "cached")) is not None:
        print(f"static / cached decode tok/s (the single-request loop on fixed shapes) = {r:.3f}")
    if (r := _ratio(medians, "llm", "cached")) is not None:
        print(f"LLM (engine, batch 1) / cached generate_tokens decode tok/s = {r:.3f}")
    for row in rows:
        if "same_tokens_as_cached" in row:
            print(f"{row['method']} greedy tokens identical to cached: {row['same_tokens_as_cached']}")


def main(args) -> int:
    from minfer.kv import kv_cache_bytes
    from minfer.llm import LLM

    methods = _methods(args)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization, enforce_eager=True)
    model, cfg = llm.model, llm.config
    prompt_ids = llm.tokenizer.encode(PROMPT)
    n = args.max_tokens
    fns, engines, peers, cannot_run = _runners(args, llm, methods, prompt_ids)
    outputs, per_round = {}, {}             # name -> its greedy tokens; name -> each round's numbers
    log(f"bench decode: {args.model}, {len(prompt_ids)} prompt tokens, {n} new tokens, "
        f"device {llm.device}, {llm.dtype}, weights {args.quantization or 'float'}, {args.repeats} interleaved rounds")
    log("measuring memory bandwidth and matmul FLOP/s ...")
    bw = measure_bandwidth(llm.device)
    flops = measure_flops(llm.device)
    medians = interleaved(fns, repeats=args.repeats, warmup=0, log=log, outputs=outputs, rounds=per_round)

    wbytes = weight_bytes_per_step(model)
    kv_mean = kv_cache_bytes(cfg, len(prompt_ids) + n / 2, model.model.embed_tokens.weight.element_size())
    quantized = {m: e.model if m.startswith("llm") else e for m, e in engines.items() if ":" in m}
    wb = {"*": wbytes, **{m: weight_bytes_per_step(q) for m, q in quantized.items()}}
    if "llama.cpp" in peers:                # its GGUF file's size: its tied head reads it whole
        wb["llama.cpp"] = peers["llama.cpp"].gguf.stat().st_size
    rows = _rows(medians, outputs, wb, kv_mean, bw)
    _agreement(quantized, outputs, rows, prompt_ids)
    ratio = _ratio(medians, "cached", "transformers")
    print(table(rows, [("method", "method", "{:>12}"), ("decode_tps", "decode tok/s", "{:.2f}"),
                       ("ttft", "TTFT s", "{:.3f}"), ("tpot_ms", "TPOT ms", "{:.1f}"),
                       ("speedup_vs_naive", "x naive", "{:.1f}"), ("x_llama_cpp", "x llama.cpp", "{:.2f}"),
                       ("bandwidth_gbs", "GB/s", "{:.2f}"),
                       ("bandwidth_fraction", "MBU", "{:.0%}"),
                       ("teacher_forced_top1", "top-1 = cached (forced)", "{:.1%}"),
                       ("free_running_prefix", "same prefix (free)", "{}")]))
    print(f"\n{machine_line(llm.device)}, {llm.dtype}")
    print(f"measured read bandwidth {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.0f} GFLOP/s; "
          f"weights read per decode step {wbytes / 1e6:.0f} MB, mean KV read {kv_mean / 1e6:.1f} MB")
    if ratio is not None:
        print(f"cached / transformers decode tok/s = {ratio:.2f}x")
    compile_report = _compile_report(peers.get("transformers-compiled"), medians, n)
    for name, why in cannot_run.items():
        print(f"{name}: not run ({why})")
    if "llama.cpp" in peers:
        print(f"llama.cpp: llama-cpp-python on {peers['llama.cpp'].gguf}, {torch.get_num_threads()} threads")
    a8 = _a8_kernel() if any("-a8" in r["method"] for r in rows) else None
    if a8:
        print(f"int8-activation kernel: {a8}")
    _print_ratios(medians, per_round, engines, rows)
    if any("teacher_forced_top1" in r for r in rows):
        print(f"top-1 = cached (forced): fed cached's {n} greedy tokens, how often a quantized method's argmax "
              f"picks the same next one; same prefix (free): its own greedy tokens equal to cached's before the first "
              f"difference (cached: weights {args.quantization or 'float'}, {llm.dtype})")
    kv_rows = kv_quant_quality(model, prompt_ids, n) if args.kv_quality else None
    write_json(args.json, {"kv_quantization": kv_rows, "benchmark": "decode", "a8_kernel": a8,
        "machine": machine_info(llm.device), "model": args.model, "dtype": str(llm.dtype),
        "quantization": args.quantization,
        "prompt_tokens": len(prompt_ids), "new_tokens": n, "repeats": args.repeats,
        "measured_bandwidth_gbs": bw / 1e9, "measured_gflops": flops / 1e9,
        "weight_bytes_per_step": wbytes, "results": rows, "cached_over_transformers": ratio,
        "transformers_compiled_compile": compile_report, "not_run": cannot_run,
    })
    return 0
