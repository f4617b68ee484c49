"""`minfer bench evict`: perplexity and top-1 agreement with the full cache, against the KV budget.

A pydoc prompt prefilled at once, then ``--score`` tokens teacher-forced through a cache that keeps
``budget`` tokens per layer; policies streaming, window, h2o, snapkv (docs/measuring.md).
"""
import argparse
import math

import torch
import torch.nn.functional as F

from minfer.bench.timing import add_run_args
from minfer.cli_args import int_list
from minfer.kv.evict import EvictingKVCache
from minfer.kv import ContiguousKVCache

POLICY_ARGS = {"window": ("streaming", {"sinks": 0}), "streaming": ("streaming", {"sinks": 4}),
               "h2o": ("h2o", {}), "snapkv": ("snapkv", {"obs_window": 32})}


@torch.no_grad()
def continuation_logits(model, cache, ids: list[int], prompt_len: int, chunk: int) -> torch.Tensor:
    """Prefill ids[:prompt_len] in one forward, then the rest ``chunk`` at a time; logits (n - prompt_len + 1, V)."""
    x = torch.tensor([ids[:prompt_len]])
    out = [model(x, torch.arange(prompt_len)[None], kv_cache=cache, last_only=True)[0]]
    for s in range(prompt_len, len(ids) - 1, chunk):
        part = ids[s:min(s + chunk, len(ids) - 1)]
        out.append(model(torch.tensor([part]), torch.arange(s, s + len(part))[None], kv_cache=cache)[0])
    return torch.cat(out).float()                                         # predicts ids[prompt_len:]


def eviction_table(model, ids: list[int], prompt_len: int, budgets, policies=tuple(POLICY_ARGS), chunk: int = 8,
                   log=lambda s: None) -> list[dict]:
    """One row per (policy, budget): perplexity of ids[prompt_len:], agreement with the full cache, KV bytes."""
    target = torch.tensor(ids[prompt_len:])
    full = continuation_logits(model, ContiguousKVCache(model.cfg, 1, len(ids)), ids, prompt_len, chunk)
    ref_top1 = full.argmax(-1)
    rows = [{"policy": "full", "budget": len(ids), "ppl": math.exp(float(F.cross_entropy(full, target))),
             "agreement": 1.0}]
    for policy in policies:
        name, kw = POLICY_ARGS[policy]
        for b in budgets:
            cache = EvictingKVCache(model, 1, b, name, **kw)
            logits = continuation_logits(model, cache, ids, prompt_len, chunk)
            rows.append({"policy": policy, "budget": b, "ppl": math.exp(float(F.cross_entropy(logits, target))),
                         "agreement": float((logits.argmax(-1) == ref_top1).float().mean()),
                         "kv_bytes": cache.nbytes()})
            log(str(rows[-1]))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args
    add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--score", type=int, default=128, help="continuation tokens scored after the prompt")
    p.add_argument("--budgets", default="32,64,128,256")
    p.add_argument("--policies", default=",".join(POLICY_ARGS))
    p.add_argument("--chunk", type=int, default=8)
    add_run_args(p, "evict", repeats=None, threads=1)


def main(args) -> int:
    from minfer.bench.report import TABLES
    from minfer.bench.timing import log, names, table, write_json
    from minfer.cli_args import set_threads
    from minfer.eval.perplexity import reference_text, text_fingerprint
    from minfer.llm import LLM

    set_threads(args.threads)
    policies = names(args.policies, "--policies", POLICY_ARGS)
    budgets = int_list(args.budgets, "--budgets")
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=False)
    text = reference_text(8 * (args.prompt_tokens + args.score))
    ids = llm.tokenizer.encode(text)[:args.prompt_tokens + args.score]
    if len(ids) < args.prompt_tokens + args.score:
        raise ValueError("the pydoc text is too short for --prompt-tokens + --score")
    rows = eviction_table(llm.model, ids, args.prompt_tokens, budgets, policies, args.chunk, log=log)
    print(table(rows, TABLES["evict"][0][2]))
    print(f"\n{args.prompt_tokens}-token pydoc prompt prefilled at once, then {args.score} tokens teacher-forced in "
          f"chunks of {args.chunk}; budget = tokens kept per layer")
    write_json(args.json, {"benchmark": "evict", "text": text_fingerprint(text), "rows": rows,
                           "prompt_tokens": args.prompt_tokens, "score": args.score, "chunk": args.chunk})
    return 0
