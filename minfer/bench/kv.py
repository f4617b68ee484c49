"""`minfer bench kv`: what paging buys, in one run on one model: capacity and fragmentation for a fixed KV
budget (contiguous vs paged), then TTFT with and without prefix caching (docs/measuring.md).
"""
import argparse
import datetime
import inspect
import math
import random

import torch

from minfer.bench.report import TABLES
from minfer.bench.timing import add_run_args, interleaved, log, table, timed_generate, write_json
from minfer.cli_args import add_model_args, set_threads

QUESTIONS = [
    "Summarise the text above in one sentence.",
    "Which module does the text describe first?",
    "List three functions mentioned above.",
    "What is the main purpose of these modules?",
    "Explain the second paragraph to a child.",
    "Write a haiku about the text above.",
    "What would you rename, and why?",
    "Give one example of using it.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--budget-mib", type=float, default=1024.0, help="KV memory budget in MiB (default 1024)")
    p.add_argument("--max-len", type=int, default=2048, help="contiguous reservation per sequence (default 2048)")
    p.add_argument("--max-tokens", type=int, default=512, help="output cap of the workload (default 512)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--num-requests", type=int, default=1000, help="workload size (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-len", type=int, default=512, help="shared prefix tokens for the TTFT test (default 512)")
    p.add_argument("--skip-ttft", action="store_true", help="capacity only (no model forward)")
    add_run_args(p, "kv", repeats=5)


# --- Part 1: capacity and fragmentation ---
def mixed_workload(n: int, seed: int, max_len: int, max_tokens: int) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs: log-normal, prompt median 256, output median 128, clipped."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out_len = int(min(max(rng.lognormvariate(math.log(128), 0.8), 16), max_tokens))
        prompt = int(min(max(rng.lognormvariate(math.log(256), 0.8), 16), max_len - max_tokens))
        out.append((prompt, out_len))
    return out


def contiguous_capacity(workload, bytes_per_token: float, budget: float, reserve) -> dict:
    """Admit requests in order, each reserving reserve(prompt, output) slots, until the budget is full."""
    used_slots = reserved = n = 0
    for prompt, out in workload:
        if (reserved + reserve(prompt, out)) * bytes_per_token > budget:
            break
        reserved += reserve(prompt, out)
        used_slots += prompt + out
        n += 1
    return {"max_seqs": n, "reserved_slots": reserved, "used_slots": used_slots,
            "fragmentation": 1 - used_slots / reserved if reserved else 0.0}


def paged_capacity(workload, cfg, budget: float, block_size: int, dtype) -> dict:
    """Admit requests through a real KVCacheManager at their final length until a block is missing."""
    from minfer.kv.block_pool import BlockPool, KVCacheManager
    from minfer.kv.paged import PagedKVCache

    num_blocks = PagedKVCache.num_blocks_for_memory(cfg, budget, block_size, dtype)
    mgr = KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching=False))
    rng = random.Random(1)
    n = 0
    for i, (prompt, out) in enumerate(workload):
        if mgr.allocate(i, [rng.randrange(1000) for _ in range(prompt)]) is None:
            break
        if not mgr.append_slots(i, out):
            mgr.free(i)
            break
        n += 1
    u = mgr.usage()
    return {"max_seqs": n, "reserved_slots": u.reserved_slots, "used_slots": u.used_slots,
            "fragmentation": u.fragmentation, "num_blocks": num_blocks}


# --- Part 2: TTFT with a shared prefix ---
def shared_prefix(tokenizer, n: int) -> list[int]:
    """n tokens of real English: a system prompt followed by standard-library docstrings."""
    import collections
    import json
    import textwrap
    text = "You are a careful assistant. Answer questions about the following documentation.\n\n"
    for mod in (json, textwrap, collections, random, inspect, argparse, datetime):
        text += inspect.getdoc(mod) + "\n\n"
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _capacity(args, cfg, dtype, budget: float, bytes_per_token: float) -> tuple[list[dict], float, dict]:
    """Part 1: how many sequences fit the budget, contiguous reservation vs paged -> (rows, ratio, paged row)."""
    workload = mixed_workload(args.num_requests, args.seed, args.max_len, args.max_tokens)
    mean_len = sum(p + o for p, o in workload) / len(workload)
    cap = [
        {"method": f"contiguous, {args.max_len} slots",
         **contiguous_capacity(workload, bytes_per_token, budget, lambda p, o: args.max_len)},
        {"method": f"contiguous, prompt+{args.max_tokens}",
         **contiguous_capacity(workload, bytes_per_token, budget, lambda p, o: p + args.max_tokens)},
    ]
    for bs in sorted({args.block_size, 8, 32} if args.block_size == 16 else {args.block_size}):
        cap.append({"method": f"paged, block {bs}", **paged_capacity(workload, cfg, budget, bs, dtype)})
    base = cap[0]["max_seqs"]
    for row in cap:
        row["x_contiguous"] = row["max_seqs"] / base if base else None
    paged_row = next(r for r in cap if r["method"] == f"paged, block {args.block_size}")
    capacity_ratio = paged_row["max_seqs"] / base if base else float("inf")
    print(f"KV capacity: {args.model} ({cfg.num_kv_layers} KV layers x {cfg.num_key_value_heads} heads x "
          f"{cfg.head_dim} dims, {dtype}) = {bytes_per_token / 1024:.1f} KiB per token; "
          f"budget {args.budget_mib:.0f} MiB = {int(budget // bytes_per_token)} token slots")
    print(f"workload: {len(workload)} requests (seed {args.seed}), prompt+output length mean {mean_len:.0f}, "
          f"max {max(p + o for p, o in workload)}; admitted in order at their final length\n")
    print(table(cap, TABLES["kv"][0][2] + [("reserved_slots", "reserved slots", "{}"),
                                           ("used_slots", "used slots", "{}")]))
    return cap, capacity_ratio, paged_row


def _ttft(args, llm, dtype) -> tuple[list[dict], float, bool]:
    """Part 2: TTFT with a shared prefix, prefix cache on vs off vs the contiguous loop."""
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams
    model, tok = llm.model, llm.tokenizer
    prefix = shared_prefix(tok, args.prefix_len)
    questions = [tok.encode("\n\nQuestion: " + q + "\nAnswer:") for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    longest = args.prefix_len + max(len(q) for q in questions) + params.max_tokens
    blocks = 4 * (-(-longest // args.block_size) + 1)
    front = {on: LLM.from_model(model, tok, block_size=args.block_size, num_blocks=blocks,
                                enable_prefix_caching=on) for on in (True, False)}
    methods = {"on": ("LLM, prefix cache on", "question only"),            # name -> (label, prefilled)
               "off": ("LLM, prefix cache off", "prefix + question"),
               "contiguous": ("contiguous loop", "prefix + question")}
    outputs = {name: [] for name in methods}

    def timed(name):
        def run():
            q = questions[len(outputs[name]) % len(questions)]
            if name == "contiguous":
                res, out = timed_generate(model, prefix + q, params)
                ttft = res["ttft"]
            else:
                res = front[name == "on"].generate(prefix + q, params)[0]
                out, ttft = res.token_ids, res.metrics.ttft
            outputs[name].append(out)
            return {"ttft_ms": 1000 * ttft}
        return run

    # The warm-up round of "on" is the cold request that fills the prefix cache.
    log(f"TTFT: {args.prefix_len}-token shared prefix + a {min(map(len, questions))}-"
        f"{max(map(len, questions))}-token question, {args.repeats} interleaved rounds ...")
    med = interleaved({n: timed(n) for n in methods}, repeats=args.repeats, warmup=1, log=log)
    same_first = outputs["on"] == outputs["off"] == outputs["contiguous"]
    off = med["off"]["ttft_ms"]
    rows = [{"method": label, "prefilled": prefilled, **med[name], "x_faster": off / med[name]["ttft_ms"]}
            for name, (label, prefilled) in methods.items()]
    print(f"\nTTFT with a {args.prefix_len}-token shared prefix (device {llm.device}, {dtype}, "
          f"{torch.get_num_threads()} CPU threads, block {args.block_size}; medians of {args.repeats} rounds)\n")
    print(table(rows, TABLES["kv"][1][2]))
    print(f"greedy outputs identical across the three: {same_first}")
    return rows, off / med["on"]["ttft_ms"], same_first


def main(args) -> int:
    from minfer.kv.paged import PagedKVCache
    from minfer.llm import LLM, resolve_dtype

    if args.budget_mib <= 0 or args.max_len < 2 or args.block_size < 1 or args.num_requests < 1:
        raise ValueError("--budget-mib, --max-len, --block-size and --num-requests must be positive")
    if not 1 <= args.max_tokens < args.max_len:
        raise ValueError(f"--max-tokens must be in [1, --max-len), got {args.max_tokens}")
    set_threads(args.threads)
    if args.skip_ttft:
        from minfer.checkpoints import load_checkpoint  # config only; weights stay unused
        cfg = load_checkpoint(args.model)[0]
        llm, dtype = None, resolve_dtype(args.dtype)
    else:
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        cfg, dtype = llm.config, llm.dtype
    budget = args.budget_mib * 2**20
    bytes_per_token = PagedKVCache.bytes_per_block(cfg, 1, dtype)

    cap, capacity_ratio, paged_row = _capacity(args, cfg, dtype, budget, bytes_per_token)     # part 1
    ttft_rows, ttft_ratio, same_first = _ttft(args, llm, dtype) if llm else ([], None, None)  # part 2

    print(f"\nsummary: paged (block {args.block_size}) fits {capacity_ratio:.2f}x the sequences of contiguous "
          f"{args.max_len}-slot reservation; fragmentation {paged_row['fragmentation']:.1%} vs "
          f"{cap[0]['fragmentation']:.1%}" + (f"; prefix caching cuts TTFT {ttft_ratio:.2f}x" if ttft_ratio else ""))
    device = llm.device if llm is not None else torch.device("cpu")
    write_json(args.json, {
        "benchmark": "kv", "device": str(device), "model": args.model, "dtype": str(dtype),
        "budget_mib": args.budget_mib, "max_len": args.max_len, "max_tokens": args.max_tokens,
        "block_size": args.block_size, "num_requests": args.num_requests, "seed": args.seed,
        "bytes_per_token": bytes_per_token, "capacity": cap, "capacity_ratio": capacity_ratio,
        "prefix_len": args.prefix_len, "repeats": args.repeats, "ttft": ttft_rows,
        "ttft_ratio": ttft_ratio, "same_first_tokens": same_first,
    })
    return 0
