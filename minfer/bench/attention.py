"""`minfer bench attention`: decode attention with GQA, several ways, on one model's head shapes.

Methods ``repeat``, ``gqa``, ``folded`` on contiguous K/V, ``paged``, ``cpu``, ``triton`` on a shuffled
paged pool; random tensors only (docs/measuring.md).
"""
import argparse
from functools import partial

import torch
import torch.nn.functional as F

from minfer.attention.sdpa import sdpa
from minfer.bench.machine import machine_line, sync
from minfer.bench.report import TABLES
from minfer.bench.timing import add_run_args, interleaved, log, positive_ints, table, write_json
from minfer.cli_args import set_threads

METHODS = ("repeat", "gqa", "folded")


def methods_for(device) -> tuple[str, ...]:
    """The methods timed on ``device``: the Triton kernel only on CUDA with Triton installed,
    the C++ kernel only on a CPU where it builds."""
    if torch.device(device).type == "cuda":
        from minfer.kernels import paged_decode
        return METHODS + ("paged",) + (("triton",) if paged_decode.triton is not None else ())
    from minfer.kernels import cpu_paged_decode
    return METHODS + ("paged",) + (("cpu",) if cpu_paged_decode.available() else ())


def shuffled_pool(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator, block_size: int = 16):
    """(B, nkv, S, hd) K and V -> the engine's layout: kv (2, num_blocks, block_size, nkv, hd) with each
    sequence's blocks at random places, block tables (B, nb), and the gather rows of ``paged``."""
    (kp, _), (vp, _) = _as_pages(k, block_size), _as_pages(v, block_size)
    perm = torch.randperm(kp.shape[0], generator=gen).to(k.device)             # logical -> physical block
    kv = torch.empty(2, *kp.shape, dtype=k.dtype, device=k.device)
    kv[0, perm], kv[1, perm] = kp, vp
    tables = perm.view(k.shape[0], -1)                                          # (B, nb)
    rows = torch.cat((tables.flatten(), tables.flatten() + kp.shape[0]))        # K's blocks, then V's
    return kv, tables, rows


def paged_gather(q: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, context: int) -> torch.Tensor:
    """The engine's plain path (``PagedKVCache.read_blocks`` + ``sdpa``): gather, then folded SDPA."""
    B, nkv, hd = q.shape[0], kv.shape[3], kv.shape[4]
    both = kv.view(2 * kv.shape[1], -1).index_select(0, rows).view(2, B, -1, nkv, hd)
    keys, values = both[0].transpose(1, 2), both[1].transpose(1, 2)            # (B, nkv, W, hd)
    mask = None
    if keys.shape[2] != context:                                                # the last block's padding
        mask = (torch.arange(keys.shape[2], device=q.device) < context)[None, None, None]
    return sdpa(q, keys, values, attn_mask=mask)


def _as_pages(k: torch.Tensor, block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nkv, S, hd) contiguous K -> a pool (B * nb, block_size, nkv, hd) and block tables (B, nb)."""
    B, nkv, S, hd = k.shape
    nb = -(-S // block_size)
    pad = torch.zeros(B, nkv, nb * block_size - S, hd, dtype=k.dtype, device=k.device)
    pool = torch.cat([k, pad], 2).transpose(1, 2).reshape(B * nb, block_size, nkv, hd).contiguous()
    tables = torch.arange(B * nb, device=k.device, dtype=torch.int32).reshape(B, nb)
    return pool, tables


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="whose head shapes to use (its weights stay unused)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated decode batch sizes (default 1,8,32)")
    p.add_argument("--context", default="256,1024", help="comma-separated context lengths (default 256,1024)")
    p.add_argument("--layers", type=int, default=None, help="attention calls per timing (default: the model's layers)")
    p.add_argument("--device", default="cpu")
    add_run_args(p, "attention", repeats=5)


def decode_attention(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, nh, 1, hd), k/v (B, nkv, S, hd) -> (B, nh, 1, hd): every key visible."""
    if method == "repeat":
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    if method == "gqa":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    if method == "folded":
        return sdpa(q, k, v)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def measure(cfg, batch: int, context: int, *, layers: int, repeats: int, device="cpu",
            log=lambda s: None) -> dict[str, float]:
    """Median ms of ``layers`` decode-attention calls (one per layer, each its own K/V) per method."""
    methods = methods_for(device)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, nh, hd, generator=gen).transpose(1, 2).to(device)   # (B, nh, 1, hd) as the model makes it
    kv = [(torch.randn(batch, nkv, context, hd, generator=gen).to(device),
           torch.randn(batch, nkv, context, hd, generator=gen).to(device)) for _ in range(layers)]
    q3 = q[:, :, 0].contiguous()                                            # (B, nh, hd)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    pools = [shuffled_pool(k, v, gen) for k, v in kv]                      # for paged and cpu
    calls = {m: [partial(decode_attention, m, q, k, v) for k, v in kv] for m in METHODS}
    calls["paged"] = [partial(paged_gather, q, pool, rows, context) for pool, _, rows in pools]
    if "cpu" in methods:
        from minfer.kernels.cpu_paged_decode import cpu_paged_decode_attention
        calls["cpu"] = [partial(cpu_paged_decode_attention, q3, pool[0], pool[1], tables, lens)
                        for pool, tables, _ in pools]
    if "triton" in methods:
        from minfer.kernels import paged_decode_attention
        pages = [(*_as_pages(k), _as_pages(v)[0]) for k, v in kv]                # (K pool, tables, V pool)
        calls["triton"] = [partial(paged_decode_attention, q3, kp, vp, tables, lens)
                           for kp, tables, vp in pages]

    def run(fns):                                   # returns None: interleaved times the call
        for fn in fns:
            fn()
        sync(device)
    med = interleaved({m: partial(run, calls[m]) for m in methods}, repeats=repeats, warmup=1, log=log)
    return {m: med[m]["s"] * 1e3 for m in methods}


def main(args) -> int:
    from minfer.checkpoints import load_checkpoint  # for the config only, as `bench kv --skip-ttft`

    batches, contexts = positive_ints(args.batch, "--batch"), positive_ints(args.context, "--context")
    set_threads(args.threads)
    cfg = load_checkpoint(args.model)[0]
    layers = args.layers or cfg.num_hidden_layers
    log(f"bench attention: {args.model} heads ({cfg.num_attention_heads} query, {cfg.num_key_value_heads} K/V, "
        f"head_dim {cfg.head_dim}), {layers} layers per timing, {torch.get_num_threads()} threads, {args.device}")
    rows = []
    for b in batches:
        for s in contexts:
            log(f"batch {b}, context {s}:")
            ms = measure(cfg, b, s, layers=layers, repeats=args.repeats, device=args.device, log=log)
            kv_mb = 2 * layers * b * cfg.num_key_value_heads * s * cfg.head_dim * 4 / 1e6
            rows.append({"batch": b, "context": s, "kv_mb": kv_mb, **{f"{m}_ms": ms[m] for m in ms},
                         **{f"x_{m}": ms["gqa"] / ms[m] for m in ms if m != "gqa"},
                         **({"cpu_x_paged": ms["paged"] / ms["cpu"]} if "cpu" in ms else {})})
    if "triton_ms" not in rows[0]:
        log("triton: not timed (needs a CUDA device and `pip install -e \".[triton]\"`)")
    print(table(rows, TABLES["attention"][0][2] + [("x_repeat", "repeat: x gqa speed", "{:.2f}"),
                                                  ("x_folded", "folded: x gqa speed", "{:.2f}"),
                                                  ("x_triton", "triton: x gqa speed", "{:.2f}")]))
    print(f"\n{layers} decode-attention calls per timing (one per layer); medians of {args.repeats} interleaved "
          f"rounds\n{machine_line(args.device)}")
    write_json(args.json, {"benchmark": "attention", "model": args.model, "device": args.device,
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "layers": layers, "rows": rows})
    return 0
