"""`minfer bench hybrid`: KV bytes per token, hybrid local/global cache vs a full cache.

For each context length n: allocate a ``ContiguousKVCache`` (every layer keeps
n tokens) and a ``HybridKVCache`` (global layers keep n, sliding-window layers
a ring of min(W, n)) for one sequence of n tokens, read their ``nbytes()``,
divide by n, and check both against the formula of ``minfer/kv/hybrid.py``.
Optionally (``--check-tokens``) one greedy generation through each cache,
whose tokens must be equal. Needs only the model's config (weights for the
check).

    minfer bench hybrid --model gemma-3-270m --contexts 512,2048,8192
"""
from __future__ import annotations

import argparse
import sys

import torch

from minfer.bench.timing import table, write_json
from minfer.cli_args import add_model_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--contexts", default="512,1024,2048,4096,8192",
                   help="comma-separated context lengths (default 512,1024,2048,4096,8192)")
    p.add_argument("--check-tokens", type=int, default=0, metavar="N",
                   help="also generate N greedy tokens through both caches and compare (default 0: skip)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")


def _contexts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--contexts must be positive integers separated by commas, got {text!r}")
    return values


def measure(cfg, contexts: list[int], dtype=torch.float32) -> list[dict]:
    """One row per context: allocated bytes per token of both caches, and the formula's."""
    from minfer.kv import ContiguousKVCache
    from minfer.kv.hybrid import HybridKVCache, kv_bytes_per_token
    size = torch.empty((), dtype=dtype).element_size()
    rows = []
    for n in contexts:
        full = ContiguousKVCache(cfg, 1, n, dtype=dtype, device="cpu").nbytes() / n
        hybrid = HybridKVCache(cfg, 1, n, dtype=dtype, device="cpu").nbytes() / n
        formula = kv_bytes_per_token(cfg, n, size)
        rows.append({"context": n, "full_B_per_token": full, "hybrid_B_per_token": hybrid,
                     "ratio": full / hybrid, "formula_full": formula["full"], "formula_hybrid": formula["hybrid"]})
    return rows


def _check_tokens(model_name: str, n: int) -> bool:
    from minfer.checkpoints import load_checkpoint
    from minfer.generate import generate_tokens
    from minfer.model import build_model
    from minfer.sampling import SamplingParams
    cfg, sd, tok = load_checkpoint(model_name)
    model = build_model(cfg, sd)
    ids = tok.encode("The capital of France is", add_special_tokens=True)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    a = list(generate_tokens(model, ids, params, kv_cache="contiguous"))
    b = list(generate_tokens(model, ids, params, kv_cache="hybrid"))
    print(f"greedy tokens, contiguous vs hybrid cache: {'equal' if a == b else 'DIFFERENT'} ({n} tokens)")
    return a == b


def main(args) -> int:
    from minfer.checkpoints.hf import read_config
    from minfer.checkpoints import resolve_model
    try:
        contexts = _contexts(args.contexts)
        cfg = read_config(resolve_model(args.model))
    except (ValueError, FileNotFoundError) as e:
        print(f"minfer bench hybrid: {e}", file=sys.stderr)
        return 2
    if not cfg.is_hybrid:
        print(f"minfer bench hybrid: {args.model} has no local/global layer mix (every layer attends alike)",
              file=sys.stderr)
        return 2
    rows = measure(cfg, contexts)
    n_local = sum(cfg.window_of(i) is not None for i in range(cfg.num_hidden_layers))
    print(f"{args.model}: {cfg.num_hidden_layers} layers ({n_local} local, window {cfg.sliding_window}), "
          f"{cfg.num_key_value_heads} KV head(s) x {cfg.head_dim}, float32, one sequence")
    print(table(rows, [("context", "context", "{:d}"), ("full_B_per_token", "full B/token", "{:.0f}"),
                       ("hybrid_B_per_token", "hybrid B/token", "{:.0f}"), ("ratio", "full/hybrid", "{:.2f}x"),
                       ("formula_hybrid", "formula hybrid", "{:.0f}")]))
    ok = all(abs(r["full_B_per_token"] - r["formula_full"]) < 1e-6 * r["formula_full"] and
             abs(r["hybrid_B_per_token"] - r["formula_hybrid"]) < 1e-6 * r["formula_hybrid"] for r in rows)
    print(f"allocated bytes {'match' if ok else 'DO NOT match'} the formula")
    same = _check_tokens(args.model, args.check_tokens) if args.check_tokens else None
    if args.json:
        write_json(args.json, {"model": args.model, "rows": rows, "tokens_equal": same})
    return 0 if ok and same is not False else 1
