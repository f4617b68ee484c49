"""Where a batch-1 fp32 decode step's time goes, against the memory-bandwidth bound.

    PYTHONPATH=$PWD python scripts/profile_decode.py [--model smollm2-135m-instruct] [--rounds 5]

One torch thread. Prints (docs/measuring.md, "The fp32 decode step, profiled"):
  1. the bound: weight + KV bytes read per token over this machine's read bandwidth (as
     ``minfer.bench.machine.measure_bandwidth``), the fastest a step could be, against the measured
     time per token of the cached loop (``minfer bench decode --methods cached``'s loop);
     and the same for the step with the fused C++ layer (``minfer/kernels/cpu_fused_layer.py``);
  2. the step's GEMVs alone, per weight shape, each pass over the real weights timed against a plain
     ``.sum()`` over the same bytes (how close a batch-1 linear streams to the read bandwidth), the
     same GEMVs on the weights stored transposed, (K, N), and the fused layer's GEMV (``linear_f32``);
  3. a torch.profiler breakdown of decode steps, plain then fused: linears, attention, the KV write,
     norms / RoPE / elementwise ops, the remaining ops, and the time outside any torch op (Python,
     and the fused layer's C++ calls: the wall time of a step minus its top-level ops).
Everything is measured in interleaved rounds in one process, on the thread's CPU time (``CLOCK``),
and each figure is its best round; on a shared machine only the ratios of one run mean anything.
The profile (3) is wall-clock, as torch.profiler records it: its shares, not its milliseconds, count.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import minfer  # noqa: F401  (before torch allocates: minfer asks for 2 MB pages, as the CLI does)
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from minfer.bench.machine import machine_line
from minfer.bench.quant import PROMPT, decode_weight_bytes
from minfer.checkpoints import load_checkpoint
from minfer.generate import forward_tokens
from minfer.kernels import cpu_fused_layer
from minfer.kv import kv_cache_bytes, make_cache
from minfer.model import build_model

ATTENTION = ("scaled_dot_product_attention", "_flash_attention", "_efficient_attention", "softmax", "minfer::")
# The CPU time of this thread: the time it ran, not the time it waited for a core (with one torch thread
# every op runs on it). On a machine shared with other jobs, wall-clock timings mostly measure the queue.
CLOCK = time.thread_time
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


def decode_steps(model, cache, prompt_ids, steps, clock):
    """Prefill, then ``steps`` greedy decode steps; returns the time of each step (s) on ``clock``."""
    logits = forward_tokens(model, cache, prompt_ids, 0, last_only=True)[-1]
    pos, times = len(prompt_ids), []
    for _ in range(steps):
        t0 = clock()
        tok = int(logits.argmax())
        logits = forward_tokens(model, cache, [tok], pos, last_only=True)[-1]
        times.append(clock() - t0)
        pos += 1
    return times


def run_steps(model, cfg, prompt_ids, steps, clock=CLOCK):
    cache = make_cache("contiguous", cfg, 1, len(prompt_ids) + steps + 1, dtype=torch.float32, device="cpu")
    return decode_steps(model, cache, prompt_ids, steps, clock)


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 3) -> float:
    """Bytes/s of a ``.sum()`` over a buffer far larger than the caches (``measure_bandwidth`` on ``CLOCK``)."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        x.sum()
        times.append(CLOCK() - t0)
    return nbytes / min(times)


def weights_by_shape(model) -> dict:
    """{(N, K): [every decode-step weight of that shape]}: the fused layer linears and the LM head."""
    shapes = defaultdict(list)
    for name, m in model.named_modules():
        if ".layers." in f".{name}." and isinstance(m, torch.nn.Linear):
            shapes[tuple(m.weight.shape)].append(m.weight)
    head = getattr(model, "lm_head", None)
    shapes[tuple((head.weight if head is not None else model.model.embed_tokens.weight).shape)].append(
        head.weight if head is not None else model.model.embed_tokens.weight)
    return shapes


_FLUSH = torch.ones(32 * 2**20)                 # 128 MB: larger than a CPU's last-level cache


def stream_times(ws: list, wts: list) -> tuple[float, float, float, float]:
    """Seconds for one pass over the weights ``ws`` (N, K) of: a 1-row F.linear on each (the model's
    GEMV), the same product on the transposed copies ``wts`` (K, N) (``x @ wt``), a plain ``.sum()``
    of each (a read of the same bytes), and the fused layer's GEMV on ``ws``. Every weight is read
    once per pass, as in a decode step."""
    x, gemv = torch.randn(1, ws[0].shape[1]), cpu_fused_layer._state["module"].linear_f32
    passes = [lambda: [F.linear(x, w) for w in ws], lambda: [x @ wt for wt in wts], lambda: [w.sum() for w in ws],
              lambda: [gemv(x, w) for w in ws]]
    times = []
    for run in passes:
        _FLUSH.sum()                            # evict the weights from the caches before each pass
        t0 = CLOCK()
        run()
        times.append(CLOCK() - t0)
    return tuple(times)


def measure(model, cfg, prompt_ids, steps, rounds):
    """Interleaved rounds of: bandwidth, decode steps (median step of each round), each weight shape's
    GEMVs and sums; the best round of each."""
    shapes = weights_by_shape(model)
    transposed = {k: [w.t().contiguous() for w in ws] for k, ws in shapes.items()}
    bw, step, fused, lin = [], [], [], defaultdict(lambda: ([], [], [], []))
    run_steps(model, cfg, prompt_ids, 4)                                                     # warm-up
    for _ in range(rounds):
        bw.append(read_bandwidth())
        step.append(statistics.median(run_steps(model, cfg, prompt_ids, steps)))
        cpu_fused_layer.prepare_fused_layers(model)
        fused.append(statistics.median(run_steps(model, cfg, prompt_ids, steps)))
        cpu_fused_layer.prepare_fused_layers(model, enabled=False)
        for shape, ws in shapes.items():
            for series, t in zip(lin[shape], stream_times(ws, transposed[shape])):
                series.append(t)
    # the least disturbed round of each: on a shared machine the others measure the neighbours too
    return max(bw), (min(step), step), (min(fused), fused), {k: (len(shapes[k]), *map(min, ts)) for k, ts in lin.items()}


def profile_table(model, cfg, prompt_ids, steps, top):
    """Print where the time of ``steps`` profiled decode steps goes, by kind of op and by op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prof_times = run_steps(model, cfg, prompt_ids, steps, time.perf_counter)
    # the trace holds the prefill too: keep the top-level events from the first decode step on
    events = [e for e in prof.events() if e.cpu_parent is None]
    events.sort(key=lambda e: e.time_range.start)
    first_step = [i for i, e in enumerate(events) if e.name == "aten::embedding"][1]
    events = events[first_step:]
    wall = sum(prof_times) * 1e6                                                     # us, profiled
    per_cat, by_op = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for e in events:
        for table, key in ((per_cat, category(e.name)), (by_op, e.name)):
            table[key][0] += 1
            table[key][1] += e.cpu_time_total
    outside = wall - sum(us for _, us in per_cat.values())
    print(f"profiled: {wall / steps / 1e3:.2f} ms per step ({steps} steps; the profiler adds its own cost per op)")
    print(f"{'where':28} {'ops/step':>9} {'ms/step':>8} {'share':>6}")
    for name, (c, us) in sorted(per_cat.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:28} {c / steps:>9.0f} {us / steps / 1e3:>8.2f} {us / wall:>6.0%}")
    print(f"{'outside torch ops (Python, C++ layers)':28} {'':>9} {outside / steps / 1e3:>8.2f} {outside / wall:>6.0%}")
    print(f"\n{'largest top-level ops':34} {'ops/step':>9} {'ms/step':>8} {'us/op':>6}")
    for name, (c, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{name:34} {c / steps:>9.0f} {us / steps / 1e3:>8.2f} {us / c:>6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=32, help="decode steps per round (and profiled)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measuring rounds")
    p.add_argument("--top", type=int, default=12, help="how many of the largest ops to list")
    args = p.parse_args()
    torch.set_num_threads(1)                       # CLOCK sees this thread only
    cfg, weights, tok = load_checkpoint(args.model)
    model = build_model(cfg, weights)
    prompt_ids = tok.encode(PROMPT)
    wbytes = decode_weight_bytes(model)
    kv = kv_cache_bytes(cfg, len(prompt_ids) + args.steps / 2, 4)
    if why := cpu_fused_layer.prepare_fused_layers(model):
        raise SystemExit(f"the fused layer cannot run here: {why}")
    cpu_fused_layer.prepare_fused_layers(model, enabled=False)
    with torch.no_grad():
        bw, (step, steps), (fused, fused_steps), lin = measure(model, cfg, prompt_ids, args.steps, args.rounds)
        bound = (wbytes + kv) / bw
        print(machine_line())
        print(f"read per token: weights {wbytes / 1e6:.1f} MB + KV {kv / 1e6:.1f} MB; "
              f"read bandwidth (a sum over 512 MB) {bw / 1e9:.1f} GB/s -> bound {bound * 1e3:.2f} ms per token")
        for name, t, ts in (("measured", step, steps), ("fused layer", fused, fused_steps)):
            print(f"{name}: {t * 1e3:.2f} ms per token ({1 / t:.1f} tok/s; rounds' medians "
                  + ", ".join(f"{r * 1e3:.1f}" for r in ts) + f" ms) = {bound / t:.0%} of the bound")
        gemv, read, ours = (sum(v[i] for v in lin.values()) for i in (1, 3, 4))
        print(f"a .sum() over the same weights, shape by shape: {read * 1e3:.2f} ms = {read / step:.0%} of the step")
        print(f"the step's GEMVs alone: {gemv * 1e3:.2f} ms ({gemv / step:.0%} of the step); "
              f"everything else: {(step - gemv) * 1e3:.2f} ms ({1 - gemv / step:.0%})")
        print(f"the fused step's GEMVs alone: {ours * 1e3:.2f} ms ({ours / fused:.0%} of the fused step); "
              f"everything else: {(fused - ours) * 1e3:.2f} ms ({1 - ours / fused:.0%})\n")
        print(f"{'weight (N, K)':14} {'count':>5} {'MB':>6} {'GEMV ms':>8} {'GB/s':>5} {'of sum':>6} "
              f"{'on (K, N): GB/s':>15} {'of sum':>6} {'fused GEMV: GB/s':>16} {'of sum':>6} {'sum GB/s':>8}")
        for (n, k), (count, g, gt, s, f) in sorted(lin.items(), key=lambda kv: -kv[1][1]):
            mb = count * n * k * 4 / 1e6
            print(f"{f'({n}, {k})':14} {count:>5} {mb:>6.1f} {g * 1e3:>8.2f} {mb / g / 1e3:>5.1f} {s / g:>6.0%} "
                  f"{mb / gt / 1e3:>15.1f} {s / gt:>6.0%} {mb / f / 1e3:>16.1f} {s / f:>6.0%} {mb / s / 1e3:>8.1f}")
        print("\nthe plain step:")
        profile_table(model, cfg, prompt_ids, args.steps, args.top)
        print("\nthe fused step:")
        cpu_fused_layer.prepare_fused_layers(model)
        profile_table(model, cfg, prompt_ids, args.steps, args.top)

if __name__ == "__main__":
    main()
