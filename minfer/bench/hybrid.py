"""`minfer bench hybrid`: KV bytes per token, hybrid local/global cache vs a full cache.

For each context length n: allocate a ``ContiguousKVCache`` (every layer keeps
n tokens) and a ``HybridKVCache`` (global layers keep n, sliding-window layers
a ring of min(W, n)) for one sequence of n tokens, read their ``nbytes()``,
divide by n, and check both against the formula of ``minfer/kv/hybrid.py``.
Then the paged engine's figure: one request of n prompt tokens through ``LLMEngine``
(scheduler, chunked prefill, block pool, ``KVCacheCoordinator``) with the forward left out,
which the block accounting does not read; the blocks it holds once its prompt is computed,
times ``PagedKVCache.bytes_per_block``, per token, against the same engine with every layer
in one group (a full cache). The engine's figure rounds each group up to whole blocks; its
peak (during a prefill chunk) adds one chunk of local blocks.
Optionally (``--check-tokens``) one greedy generation through each cache,
whose tokens must be equal. Needs only the model's config (weights for the
check).

    minfer bench hybrid --model gemma-3-270m --contexts 512,2048,8192
"""
from __future__ import annotations

import argparse
import dataclasses
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


class _BookkeepingRunner:
    """The engine's runner without the forward: zero logits, the real block pool and managers."""

    def __init__(self, cfg, num_blocks: int, block_size: int, budget: int):
        from minfer.kv.block_pool import BlockPool, KVCacheManager
        from minfer.kv.coordinator import KVCacheCoordinator, kv_cache_groups
        pool = BlockPool(num_blocks, block_size)
        self.kv_manager = KVCacheCoordinator(pool, [w for w, _ in kv_cache_groups(cfg)], first_chunk=budget) \
            if cfg.is_hybrid else KVCacheManager(pool)
        self.vocab_size, self.peak = cfg.vocab_size, 0

    def execute(self, chunks, sample_rows):
        pool = self.kv_manager.pool                     # blocks held while a prefill forward would run
        if any(c.num_tokens > 1 for c in chunks):
            self.peak = max(self.peak, pool.num_blocks - pool.num_free_blocks)
        return torch.zeros(len(sample_rows), self.vocab_size)


def engine_bytes_per_token(cfg, n: int, block_size: int = 16, budget: int = 512, dtype=torch.float32) -> dict:
    """KV bytes per token the engine holds for one request of ``n`` computed tokens; peak during prefill."""
    from minfer.engine.llm_engine import LLMEngine
    from minfer.engine.scheduler import SchedulerConfig
    from minfer.kv.paged import PagedKVCache
    from minfer.sampling import SamplingParams
    per_block = PagedKVCache.bytes_per_block(cfg, block_size, dtype)
    runner = _BookkeepingRunner(cfg, -(-n // block_size) * cfg.num_hidden_layers + 1, block_size, budget)
    engine = LLMEngine(runner, SchedulerConfig(max_num_batched_tokens=budget), max_model_len=n + 2)
    engine.add_request([i % cfg.vocab_size for i in range(n)], SamplingParams(max_tokens=2, ignore_eos=True))
    held = 0
    while engine.has_unfinished_requests():
        engine.step()
        if engine.num_steps == -(-n // budget):          # the step that computed the prompt's last chunk
            held = engine.kv_cache_usage[0]
    return {"B_per_token": held * per_block / n, "peak_B_per_token": runner.peak * per_block / n}


def measure_engine(cfg, contexts: list[int]) -> list[dict]:
    """One row per context: the engine's bytes per token, hybrid groups vs every layer in one group."""
    full_cfg = dataclasses.replace(cfg, layer_types=None, sliding_window=None)
    rows = []
    for n in contexts:
        full, hybrid = engine_bytes_per_token(full_cfg, n), engine_bytes_per_token(cfg, n)
        rows.append({"context": n, "full_B_per_token": full["B_per_token"],
                     "hybrid_B_per_token": hybrid["B_per_token"], "ratio": full["B_per_token"] / hybrid["B_per_token"],
                     "hybrid_peak_B_per_token": hybrid["peak_B_per_token"]})
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
    engine_rows = measure_engine(cfg, contexts)
    print("paged engine (block size 16, token budget 512): blocks held once the prompt is computed")
    print(table(engine_rows, [("context", "context", "{:d}"), ("full_B_per_token", "full B/token", "{:.0f}"),
                              ("hybrid_B_per_token", "hybrid B/token", "{:.0f}"), ("ratio", "full/hybrid", "{:.2f}x"),
                              ("hybrid_peak_B_per_token", "hybrid peak in prefill", "{:.0f}")]))
    same = _check_tokens(args.model, args.check_tokens) if args.check_tokens else None
    if args.json:
        write_json(args.json, {"model": args.model, "rows": rows, "engine": engine_rows, "tokens_equal": same})
    return 0 if ok and same is not False else 1
