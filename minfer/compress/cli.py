"""`minfer teacher-cache`: cache the teacher's signals for the compression commands (one CPU thread by
default, ``--threads``; results written atomically)."""
from __future__ import annotations

import argparse

from minfer.cli_args import add_model_args, set_threads
from minfer.compress.common import DEFAULT_CACHE, log


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--out", default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--tokens", type=int, default=120_000, help="training tokens to cache (default 120000)")
    p.add_argument("--heldout-tokens", type=int, default=16_384, help="held-out tokens to cache (default 16384)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=32, help="top-k teacher log-probs kept per token (default 32)")
    p.add_argument("--threads", type=int, default=1)


def main(args) -> int:
    """Build (or resume) the train and held-out teacher caches under --out/{train,heldout}."""
    from pathlib import Path

    from minfer.compress.corpus import split_fingerprint, token_stream
    from minfer.compress.teacher import build_teacher_cache
    from minfer.llm import LLM

    set_threads(args.threads)
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=False)
    eos = (llm.tokenizer.eos_token_ids or [None])[0]
    for split, n in (("heldout", args.heldout_tokens), ("train", args.tokens)):
        ids = token_stream(llm.tokenizer, split, n, eos)
        meta = {"model": str(args.model), "split": split, "corpus": split_fingerprint()}
        log(f"{split}: {len(ids)} tokens")
        build_teacher_cache(llm.model, ids, Path(args.out) / split, seq_len=args.seq_len, k=args.k, meta=meta)
    log(f"teacher cache in {args.out}")
    return 0
