"""`minfer bench hybrid`: KV bytes per token, hybrid local/global cache vs a full cache.

Allocated caches against the formula of ``minfer/kv/hybrid.py``, then the paged engine's blocks
(forward left out); ``--check-tokens N`` compares greedy tokens through both caches (docs/measuring.md).
"""
import argparse
import dataclasses

import torch

from minfer.bench.report import TABLES
from minfer.bench.timing import positive_ints, table, write_json
from minfer.cli_args import add_model_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--contexts", default="512,1024,2048,4096,8192",
                   help="comma-separated context lengths (default 512,1024,2048,4096,8192)")
    p.add_argument("--check-tokens", type=int, default=0, metavar="N",
                   help="also generate N greedy tokens through both caches and compare (default 0: skip)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")


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
    runner = _BookkeepingRunner(cfg, -(-(n + 2) // block_size) * cfg.num_hidden_layers + 1, block_size, budget)
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
    a, b = (list(generate_tokens(model, ids, params, kv_cache=kind)) for kind in ("contiguous", "hybrid"))
    print(f"greedy tokens, contiguous vs hybrid cache: {'equal' if a == b else 'DIFFERENT'} ({n} tokens)")
    return a == b


def main(args) -> int:
    from minfer.checkpoints.hf import read_config
    from minfer.checkpoints import resolve_model
    contexts = positive_ints(args.contexts, "--contexts")
    cfg = read_config(resolve_model(args.model))
    if not cfg.is_hybrid:
        raise ValueError(f"{args.model} has no local/global layer mix (every layer attends alike)")
    rows = measure(cfg, contexts)
    n_local = sum(cfg.window_of(i) is not None for i in range(cfg.num_hidden_layers))
    print(f"{args.model}: {cfg.num_hidden_layers} layers ({n_local} local, window {cfg.sliding_window}), "
          f"{cfg.num_key_value_heads} KV head(s) x {cfg.head_dim}, float32, one sequence")
    allocated, engine = (cols for _, _, cols in TABLES["hybrid"])           # the report's columns
    print(table(rows, allocated + [("formula_hybrid", "formula hybrid", "{:.0f}")]))
    ok = all(abs(r["full_B_per_token"] - r["formula_full"]) < 1e-6 * r["formula_full"] and
             abs(r["hybrid_B_per_token"] - r["formula_hybrid"]) < 1e-6 * r["formula_hybrid"] for r in rows)
    print(f"allocated bytes {'match' if ok else 'DO NOT match'} the formula")
    engine_rows = measure_engine(cfg, contexts)
    print("paged engine (block size 16, token budget 512): blocks held once the prompt is computed")
    print(table(engine_rows, engine))
    same = _check_tokens(args.model, args.check_tokens) if args.check_tokens else None
    write_json(args.json, {"model": args.model, "rows": rows, "engine": engine_rows, "tokens_equal": same})
    return 0 if ok and same is not False else 1
