"""Where a batch-1 fp32 decode step's time goes, against the memory-bandwidth bound.

    PYTHONPATH=$PWD python scripts/profile_decode.py [--model smollm2-135m-instruct] [--threads 1]

Prints (docs/measuring.md, "The fp32 decode step, profiled"):
  1. the bound: weight + KV bytes read per token, this machine's read bandwidth
     (minfer.bench.machine.measure_bandwidth), so the fastest a step could be, against the measured
     time per token of the cached loop (``minfer bench decode --methods cached``'s loop);
  2. a torch.profiler breakdown of decode steps: each linear shape (count, us per call, effective
     GB/s of its weight), attention, the KV write, norms / RoPE / elementwise ops, the remaining
     ops, and the time outside any torch op (Python: the wall time of a step minus its top-level ops).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from minfer.bench.machine import machine_line, measure_bandwidth
from minfer.bench.quant import PROMPT, decode_weight_bytes
from minfer.checkpoints import load_checkpoint
from minfer.generate import forward_tokens
from minfer.kv import kv_cache_bytes, make_cache
from minfer.model import build_model

ATTENTION = ("scaled_dot_product_attention", "_flash_attention", "_efficient_attention", "softmax", "minfer::")
KV_WRITE = ("index_copy_", "index_put_", "copy_")
NORM_ROPE_ELEMENTWISE = ("mul", "add", "sub", "neg", "rsqrt", "pow", "mean", "silu", "cat", "cos", "sin",
                         "to", "_to_copy", "div", "embedding", "argmax", "exp", "max")


def category(name: str) -> str:
    """The row of the breakdown a top-level torch op belongs to."""
    op = name.removeprefix("aten::")
    if op in ("linear", "matmul", "mm", "addmm", "mv"):
        return "linears"
    if any(a in name for a in ATTENTION):
        return "attention"
    if op in KV_WRITE:
        return "KV write and copies"
    if op in NORM_ROPE_ELEMENTWISE:
        return "norms, RoPE, elementwise"
    return "views and other ops"


def decode_steps(model, cache, prompt_ids, steps, profiler=None):
    """Prefill, then ``steps`` greedy decode steps; returns the wall time of each step (s)."""
    logits = forward_tokens(model, cache, prompt_ids, 0, last_only=True)[-1]
    pos, times = len(prompt_ids), []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = int(logits.argmax())
        logits = forward_tokens(model, cache, [tok], pos, last_only=True)[-1]
        times.append(time.perf_counter() - t0)
        pos += 1
        if profiler is not None:
            profiler.step()
    return times


def run_steps(model, cfg, prompt_ids, steps, profiler=None):
    cache = make_cache("contiguous", cfg, 1, len(prompt_ids) + steps + 1, dtype=torch.float32, device="cpu")
    return decode_steps(model, cache, prompt_ids, steps, profiler)


def linear_rows(events, steps):
    """(weight shape, calls per step, us per call, GB/s) per linear weight shape, from aten::linear events."""
    by_shape = defaultdict(list)
    for e in events:
        if e.name == "aten::linear" and e.cpu_parent is None and len(e.input_shapes) > 1:
            by_shape[tuple(e.input_shapes[1])].append(e.cpu_time_total)           # us
    rows = []
    for shape, ts in sorted(by_shape.items(), key=lambda kv: -sum(kv[1])):
        us = statistics.median(ts)
        rows.append((shape, len(ts) / steps, us, shape[0] * shape[1] * 4 / (us * 1e-6) / 1e9))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (and profiled)")
    p.add_argument("--top", type=int, default=12, help="how many of the largest ops to list")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg, weights, tok = load_checkpoint(args.model)
    model = build_model(cfg, weights)
    prompt_ids = tok.encode(PROMPT)
    bw = measure_bandwidth()
    wbytes = decode_weight_bytes(model)
    kv = kv_cache_bytes(cfg, len(prompt_ids) + args.steps / 2, 4)
    with torch.no_grad():
        run_steps(model, cfg, prompt_ids, 4)                                            # warm-up
        plain = [statistics.median(run_steps(model, cfg, prompt_ids, args.steps)) for _ in range(3)]
        step = statistics.median(plain)
        bound = (wbytes + kv) / bw
        print(machine_line(), f"| {args.threads} thread(s)")
        print(f"read per token: weights {wbytes / 1e6:.1f} MB + KV {kv / 1e6:.1f} MB; "
              f"read bandwidth {bw / 1e9:.1f} GB/s -> bound {bound * 1e3:.2f} ms")
        print(f"measured: {step * 1e3:.2f} ms per token ({1 / step:.1f} tok/s; rounds "
              + ", ".join(f"{t * 1e3:.2f}" for t in plain) + f" ms) = {bound / step:.0%} of the bound\n")

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            prof_times = run_steps(model, cfg, prompt_ids, args.steps)
    # the prefill and the warm-up are in the trace too: keep the events that start in the decode steps
    events = [e for e in prof.events() if e.cpu_parent is None]
    starts = sorted(events, key=lambda e: e.time_range.start)
    first_decode = [e for e in starts if e.name == "aten::linear" and e.input_shapes and e.input_shapes[0][1] == 1]
    t_from = first_decode[0].time_range.start - 50 if first_decode else 0
    events = [e for e in events if e.time_range.start >= t_from]
    wall = sum(prof_times) * 1e6                                                     # us, profiled
    per_cat = defaultdict(float)
    counts = defaultdict(int)
    for e in events:
        per_cat[category(e.name)] += e.cpu_time_total
        counts[category(e.name)] += 1
    outside = wall - sum(per_cat.values())
    n = args.steps
    print(f"profiled: {wall / n / 1e3:.2f} ms per step ({n} steps; the profiler adds its own cost per op)")
    print(f"{'where':28} {'ops/step':>9} {'ms/step':>8} {'share':>6}")
    for name, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"{name:28} {counts[name] / n:>9.0f} {us / n / 1e3:>8.2f} {us / wall:>6.0%}")
    print(f"{'outside torch ops (Python)':28} {'':>9} {outside / n / 1e3:>8.2f} {outside / wall:>6.0%}")
    by_op = defaultdict(lambda: [0, 0.0])
    for e in events:
        by_op[e.name][0] += 1
        by_op[e.name][1] += e.cpu_time_total
    print(f"\n{'largest top-level ops':28} {'ops/step':>9} {'ms/step':>8} {'us/op':>6}")
    for name, (c, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{name:28} {c / n:>9.0f} {us / n / 1e3:>8.2f} {us / c:>6.1f}")
    print(f"\n{'linear weight (N, K)':22} {'calls/step':>10} {'us/call':>8} {'GB/s':>6} {'x bandwidth':>12}")
    for shape, calls, us, gbs in linear_rows(events, n):
        print(f"{str(shape):22} {calls:>10.0f} {us:>8.0f} {gbs:>6.1f} {gbs * 1e9 / bw:>12.0%}")


if __name__ == "__main__":
    main()
