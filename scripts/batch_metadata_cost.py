"""Per-step cost of flattening a decode batch: prepare_batch + PagedKVCache.set_batch, no forward.

    python scripts/batch_metadata_cost.py LABEL      (the label is printed first; compare two checkouts
    by running it alternately with PYTHONPATH pointing at each)
"""
import random
import statistics
import sys
import time

import torch

from minfer.config import ModelConfig
from minfer.engine.runner import prepare_batch
from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.kv.paged import PagedKVCache

torch.set_num_threads(1)
cfg = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=64, max_position_embeddings=2048, head_dim=64)


class R:                       # a request: id and token ids (their values do not matter here)
    def __init__(s, i, n):
        s.request_id, s.all_token_ids = i, [0] * n


class C:                       # a scheduled chunk
    def __init__(s, r, st, n):
        s.request, s.start, s.num_tokens = r, st, n


out = {}                       # batch size -> median microseconds per step (7 rounds of 300 steps)
for B in (1, 32):
    rng = random.Random(0)
    mgr = KVCacheManager(BlockPool(4096, 16, False))
    cache = PagedKVCache(cfg, 4096, 16)
    lens = [rng.randint(16, 770) for _ in range(B)]             # ragged contexts, as in bench serve
    reqs = [R(i, n) for i, n in enumerate(lens)]
    for r, n in zip(reqs, lens):
        mgr.allocate(r.request_id, r.all_token_ids)
    chunks = [C(r, n - 1, 1) for r, n in zip(reqs, lens)]
    ts = []
    for rep in range(7):
        t = time.perf_counter()
        for _ in range(300):
            ids, meta = prepare_batch(mgr, chunks)
            cache.set_batch(meta)
        ts.append((time.perf_counter() - t) / 300 * 1e6)
    out[B] = statistics.median(ts)
print(sys.argv[1] if len(sys.argv) > 1 else "this checkout", " ".join(f"batch {b}: {us:.0f} us/step" for b, us in out.items()))
