"""``minfer bench parallel``: 2 ranks against 1 on this machine (``tp``, ``pp``, ``disagg``, each in one
2-process gloo group), and when tensor parallelism pays on real hardware (docs/measuring.md).
"""
import argparse

import torch

from minfer.bench.timing import log, names, table, write_json
from minfer.cli_args import positive_int

PARTS = ("tp", "pp", "disagg")

# H100 SXM5, from NVIDIA's datasheet: NVLink 4 = 900 GB/s per GPU (both directions together),
# HBM3 3.35 TB/s, ~989 TFLOP/s dense BF16. ALPHA is an assumption (typical NCCL small-message
# all-reduce latency inside an NVLink node), not a measurement.
H100 = {"link_GBps": 450.0, "hbm_TBps": 3.35, "tflops": 989.0, "alpha_us": 10.0}
LLAMA_70B = {"hidden": 8192, "layers": 80, "heads": 64, "kv_heads": 8, "head_dim": 128,
             "intermediate": 28672, "vocab": 128256}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--tokens", type=positive_int, default=16, help="decode tokens per TP round (default 16)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; medians (default 3)")
    p.add_argument("--quick", action="store_true", help="small models (the lesson and the tests use this)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def layer_params(m: dict) -> int:
    h, hd = m["hidden"], m["head_dim"]
    return h * m["heads"] * hd * 2 + h * m["kv_heads"] * hd * 2 + 3 * h * m["intermediate"]


def tp_formulas(model: dict = LLAMA_70B, hw: dict = H100, tp: int = 8, batch: int = 1, bytes_per: int = 2) -> dict:
    """Per decode step and layer: all-reduce payload and time vs weight-read and FLOP time.

        payload  = batch * hidden * bytes                     (one all-reduce; 2 per layer)
        t_comm   = 2 * (alpha + 2 (tp-1)/tp * payload / link_bandwidth)   ring all-reduce
        t_mem    = layer_params * bytes / tp / hbm_bandwidth              decode reads every weight
        t_flops  = 2 * batch * layer_params / tp / peak_flops
        TP pays while t_comm is small next to max(t_mem, t_flops) saved by splitting.
    """
    payload = batch * model["hidden"] * bytes_per
    t_comm = 2 * (hw["alpha_us"] * 1e-6 + 2 * (tp - 1) / tp * payload / (hw["link_GBps"] * 1e9))
    p = layer_params(model)
    t_mem = p * bytes_per / tp / (hw["hbm_TBps"] * 1e12)
    t_flops = 2 * batch * p / tp / (hw["tflops"] * 1e12)
    total_bytes = (model["layers"] * p + 2 * model["vocab"] * model["hidden"]) * bytes_per
    return {"tp": tp, "batch": batch, "payload_bytes": payload, "t_comm_us": t_comm * 1e6,
            "t_mem_us": t_mem * 1e6, "t_flops_us": t_flops * 1e6,
            "comm_share": t_comm / (t_comm + max(t_mem, t_flops)),
            "weights_GB": total_bytes / 1e9, "weights_per_gpu_GB": total_bytes / tp / 1e9}


def _run(worker, *args) -> dict:
    import tempfile
    from pathlib import Path

    from minfer.distributed import comm
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.pt"
        comm.launch(worker, 2, str(out), *args, timeout_s=300)
        return torch.load(out, weights_only=False)


QUICK_TP = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, intermediate_size=768, max_position_embeddings=512)


def run(parts=PARTS, tokens: int = 16, rounds: int = 3, quick: bool = False, log=print) -> dict:
    from minfer.distributed import measure
    results: dict = {}
    if "tp" in parts:
        log("tp: 1 rank vs 2 ranks ...")
        results["tp"] = _run(measure.tp_decode_worker, QUICK_TP if quick else None, 32 if quick else 64,
                             tokens, rounds)
    if "pp" in parts:
        log("pp: micro-batches through 2 stages ...")
        results["pp"] = _run(measure.pp_bubble_worker, QUICK_TP if quick else None)
    if "disagg" in parts:
        log("disagg: colocated vs disaggregated under a mixed workload ...")
        trace = dict(n_short=4, short_out=24, long_prompt=256, n_long=2) if quick else None
        results["disagg"] = _run(measure.disagg_bench_worker, None, max(1, rounds - 1), trace)
    results["formulas"] = [tp_formulas(tp=t, batch=b) for t in (2, 8) for b in (1, 64)]
    return results


def report(results: dict) -> str:
    out = []
    if "tp" in results:
        r = results["tp"]
        base = next(iter(r["timing"].values()))                     # 1 rank
        rows = [{"mode": k, **v, "prefill_ms": v["prefill_s"] * 1e3, "tpot_ms": v["tpot_s"] * 1e3,
                 "comm_ms": v["comm_s_per_token"] * 1e3, "comm_share": v["comm_s_per_token"] / v["tpot_s"],
                 "prefill_ratio": base["prefill_s"] / v["prefill_s"],
                 "tpot_ratio": base["tpot_s"] / v["tpot_s"]} for k, v in r["timing"].items()]
        cfg = r["config"]
        out.append(f"Tensor parallel decode: random model h={cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
                   f"vocab {cfg['vocab_size']}, fp32, prompt {r['prompt_len']}, {r['n_tokens']} tokens, "
                   "1 thread per process (medians of interleaved rounds)")
        out.append(table(rows, [("mode", "mode", "{}"), ("prefill_ms", "prefill ms", "{:.1f}"),
                                ("prefill_ratio", "prefill speed-up", "{:.2f}x"),
                                ("tpot_ms", "TPOT ms", "{:.1f}"), ("tpot_ratio", "decode speed-up", "{:.2f}x"),
                                ("all_reduce_calls_per_token", "all-reduces/token", "{:.0f}"),
                                ("all_reduce_bytes_per_token", "all-reduce B/token", "{:.0f}"),
                                ("all_gather_bytes_per_token", "all-gather B/token", "{:.0f}"),
                                ("comm_ms", "comm ms/token", "{:.1f}"), ("comm_share", "comm share", "{:.0%}")]))
        calls = rows[-1]["all_reduce_calls_per_token"]
        if calls:
            out.append(f"  one all-reduce of {rows[-1]['all_reduce_bytes_per_token'] / calls:.0f} B costs "
                       f"{rows[-1]['comm_s_per_token'] / calls * 1e6:.0f} us here (gloo, loopback, waiting included)")
    if "pp" in results:
        from minfer.distributed.pipeline import bubble_fraction
        rows = [{"m": m, "ms": v["seconds"] * 1e3, "idle": v["idle_fraction"], "gpipe": bubble_fraction(2, m)}
                for m, v in results["pp"].items()]
        out.append("\nPipeline parallel, 2 stages, one forward of a batch of 8 x 32 tokens")
        out.append(table(rows, [("m", "micro-batches", "{}"), ("ms", "forward ms", "{:.0f}"),
                                ("idle", "measured idle", "{:.0%}"), ("gpipe", "GPipe (S-1)/(M+S-1)", "{:.0%}")]))
    if "disagg" in results:
        s = results["disagg"]["summary"]
        rows = [{"mode": k, **v} for k, v in s.items()]
        out.append("\nPrefill/decode disaggregation, mixed workload (short chats decoding, long prompts arriving); "
                   "colocated = 1 process, disaggregated = 2 processes")
        out.append(table(rows, [("mode", "mode", "{}"), ("ttft_short_p50_ms", "TTFT short p50 ms", "{:.0f}"),
                                ("ttft_long_p50_ms", "TTFT long p50 ms", "{:.0f}"),
                                ("first_gap_p50_ms", "1st->2nd token p50 ms", "{:.0f}"),
                                ("tpot_short_p50_ms", "TPOT short p50 ms", "{:.1f}"),
                                ("itl_short_p99_ms", "ITL short p99 ms (after 2nd)", "{:.0f}"),
                                ("itl_short_max_ms", "ITL short max ms", "{:.0f}")]))
    f = results.get("formulas")
    if f:
        out.append("\nWhen TP pays, per decode step and layer (2 all-reduces), Llama-70B in bf16 on H100 SXM "
                   f"(NVLink {H100['link_GBps']:.0f} GB/s per direction, HBM {H100['hbm_TBps']} TB/s, "
                   f"{H100['tflops']:.0f} TFLOP/s, assumed all-reduce latency {H100['alpha_us']:.0f} us):")
        out.append("  t_comm = 2 (alpha + 2(N-1)/N * batch*hidden*bytes / link_bw);  t_mem = layer_bytes / N / hbm_bw;"
                   "  t_flops = 2 batch layer_params / N / peak")
        out.append(table(f, [("tp", "TP", "{}"), ("batch", "batch", "{}"), ("payload_bytes", "all-reduce B", "{}"),
                             ("t_comm_us", "t_comm us", "{:.1f}"), ("t_mem_us", "t_mem us", "{:.1f}"),
                             ("t_flops_us", "t_flops us", "{:.1f}"), ("comm_share", "comm share", "{:.0%}"),
                             ("weights_per_gpu_GB", "weights/GPU GB", "{:.1f}")]))
    return "\n".join(out)


def main(args) -> int:
    parts = names(args.parts, "--parts", PARTS)
    results = run(parts, args.tokens, args.rounds, args.quick, log=log)
    print(report(results))
    write_json(args.json, {"torch": torch.__version__, "results": results})
    return 0
