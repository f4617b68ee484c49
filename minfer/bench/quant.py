"""`minfer bench quant`: weight bytes, decode speed and perplexity per weight format, in one run.

Formats timed interleaved (batch 1, greedy); agreement with fp32 free-running and teacher-forced.
What each column means, and why int4-g32 fits SmolLM2's Q4_1 weights: docs/measuring.md.
"""
import argparse
import time
from functools import partial

import torch

from minfer.bench.machine import measure_bandwidth
from minfer.bench.report import TABLES
from minfer.bench.timing import add_run_args, interleaved, log, names, table, timed_generate, write_json
from minfer.cli_args import int_in, set_threads

PROMPT = ("The history of computing is a story of machines that got smaller, faster and cheaper. "
          "Write a long essay about it, starting with the abacus.")
DEFAULT_FORMATS = "fp32,bf16,int8,int4-g32,int4-g64,int4-g128"
AGREEMENT_TOKENS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"comma-separated: fp32, bf16 and any quantization name (default {DEFAULT_FORMATS})")
    p.add_argument("--lm-head", default="int8",
                   help="LM head of the quantized formats: int8 (default) | same | none")
    p.add_argument("--max-tokens", type=int_in(2), default=256, help="new tokens per timed run (default 256)")
    p.add_argument("--skip-ppl", action="store_true", help="do not measure perplexity")
    p.add_argument("--ppl-chars", type=int, default=None, help="characters of the perplexity text")
    add_run_args(p, "quant", repeats=3)


def model_bytes(model) -> int:
    """Bytes the model occupies (parameters and stored quantized tensors)."""
    from minfer.quant.linear import QuantizedLinear
    quant = sum(m.weight_nbytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    return quant + sum(p.numel() * p.element_size() for p in model.parameters())


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all of them, less an embedding that is not the LM head too
    (one row of it per token is read)."""
    emb = model.model.embed_tokens.weight
    head = getattr(model, "lm_head", None)         # None, or e.g. a prepacked tied head on emb
    if model.cfg.tie_word_embeddings and (head is None or getattr(head, "weight", None) is emb):
        return model_bytes(model)
    return model_bytes(model) - emb.numel() * emb.element_size()


def _load(name: str, model: str, lm_head):
    """``model`` in format ``name`` through the one front door (``minfer.loading.load_model``)."""
    from minfer.loading import load_model
    from minfer.quant.apply import quantize_model
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(name, name)
    if dtype in ("float32", "bfloat16"):
        return load_model(model, dtype=dtype)
    loaded = load_model(model)                    # plain float32 linears, then this format's own LM head
    return loaded._replace(model=quantize_model(loaded.model, name, lm_head=lm_head))


@torch.no_grad()
def _teacher_forced_agreement(model, prompt_ids, reference_tokens) -> float:
    """Share of positions where argmax(model | reference prefix) == the reference token."""
    full = prompt_ids + reference_tokens
    logits = model(torch.tensor([full]), torch.arange(len(full))[None])[0]      # (T, V)
    pred = logits[len(prompt_ids) - 1:-1].argmax(-1).tolist()
    return sum(a == b for a, b in zip(pred, reference_tokens)) / len(reference_tokens)


def _rows(models: dict, medians: dict, tokens: dict, ppl: dict, base: str, prompt_ids: list[int], cfg, n: int,
          bw: float) -> list[dict]:
    """One row per format: weight bytes, speed, bandwidth used, agreement with ``base``, perplexity."""
    from minfer.kv import kv_cache_bytes
    ref_toks = tokens[base][:AGREEMENT_TOKENS]
    kv_mean = kv_cache_bytes(cfg, len(prompt_ids) + n / 2, 4)
    rows = []
    for name in models:
        model, r = models[name], medians[name]
        wbytes = decode_weight_bytes(model)
        kv = kv_mean * model.model.embed_tokens.weight.element_size() / 4
        row = {"format": name, "weight_bytes": wbytes, "weight_mb": wbytes / 1e6,
               "model_mb": model_bytes(model) / 1e6, **r,
               "speedup": r["decode_tps"] / medians[base]["decode_tps"],
               "bandwidth_gbs": (wbytes + kv) * r["decode_tps"] / 1e9}
        row["bandwidth_fraction"] = row["bandwidth_gbs"] * 1e9 / bw
        mine = tokens[name][:AGREEMENT_TOKENS]
        row["greedy_agreement"] = sum(a == b for a, b in zip(mine, ref_toks)) / len(ref_toks)
        row["teacher_forced_agreement"] = _teacher_forced_agreement(model, prompt_ids, ref_toks)
        if name in ppl:
            row["perplexity"] = ppl[name].perplexity
            row["ppl_change"] = ppl[name].perplexity / ppl[base].perplexity - 1
        rows.append(row)
    return rows


def main(args) -> int:
    from minfer.eval.perplexity import DEFAULT_CHARS, perplexity, reference_text, text_fingerprint
    from minfer.sampling import SamplingParams

    formats = names(args.formats, "--formats")
    if not formats:
        raise ValueError("--formats is empty")
    set_threads(args.threads)
    lm_head = None if args.lm_head == "none" else args.lm_head
    loaded = {name: _load(name, args.model, lm_head) for name in formats}
    cfg, tok = loaded[formats[0]].config, loaded[formats[0]].tokenizer
    models = {name: x.model for name, x in loaded.items()}
    prompt_ids = tok.encode(PROMPT)
    n = args.max_tokens
    log(f"bench quant: {args.model}, formats {formats}, LM head of quantized formats: {args.lm_head}; "
        f"{len(prompt_ids)} prompt tokens, {n} new tokens, batch 1, cpu, {args.repeats} interleaved rounds")
    bw = measure_bandwidth("cpu")
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    runs = {name: partial(timed_generate, models[name], prompt_ids, params) for name in formats}
    medians = interleaved(runs, repeats=args.repeats, warmup=1, log=log, outputs=tokens)
    ppl, text = {}, None
    if not args.skip_ppl:
        text = reference_text(args.ppl_chars or DEFAULT_CHARS)
        ids = tok.encode(text)
        for name in formats:
            t0 = time.perf_counter()
            ppl[name] = perplexity(models[name], ids)
            log(f"  perplexity {name}: {ppl[name].perplexity:.4f} ({time.perf_counter() - t0:.0f} s)")
    base = "fp32" if "fp32" in formats else formats[0]
    rows = _rows(models, medians, tokens, ppl, base, prompt_ids, cfg, n, bw)
    print(table(rows, TABLES["quant"][0][2] + [("bandwidth_gbs", "GB/s", "{:.1f}"),
                                              ("bandwidth_fraction", "of measured", "{:.0%}")]))
    print(f"\nmachine: measured read bandwidth {bw / 1e9:.1f} GB/s; {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}")
    print(f"quantized formats: body as named, LM head {args.lm_head}; fast kernels compute in bfloat16")
    fp = text_fingerprint(text) if text else None
    if fp:
        r0 = ppl[formats[0]]
        print(f"perplexity text: {fp['source']}, first {fp['chars']} chars, Python {fp['python']}, "
              f"sha256 {fp['sha256']}; windows of {r0.context} tokens, stride {r0.stride}, "
              f"{r0.scored_tokens} tokens scored")
    print(f"agreement: first {AGREEMENT_TOKENS} greedy tokens vs {base} (free-running / per step)")
    write_json(args.json, {"benchmark": "quant", "model": args.model, "lm_head": args.lm_head,
                           "prompt_tokens": len(prompt_ids), "new_tokens": n, "repeats": args.repeats,
                           "measured_bandwidth_gbs": bw / 1e9, "perplexity_text": fp, "results": rows})
    return 0
