"""`minfer bench quant`: weight bytes, decode speed and perplexity per weight format, in one run.

    minfer bench quant                          # fp32, bf16, int8, int4-g32, int4-g64, int4-g128
    minfer bench quant --formats fp32,int8 --max-tokens 64 --skip-ppl

Every format is a separate copy of the same model in memory. Decode speed:
greedy, batch 1, ``--max-tokens`` new tokens (EOS ignored) from the same
prompt, the formats timed in interleaved rounds (A, B, C, A, B, C, ...) and the
median taken, so that a noisy neighbour slows all of them alike. Perplexity:
``minfer.eval.perplexity`` on its fixed text, once per format (it is
deterministic). Agreement: the share of the first 64 greedy tokens equal to
fp32's (free-running: after the first difference the texts part ways), and
the share of those 64 positions where the format's greedy choice equals fp32's
given fp32's own prefix (teacher-forced, i.e. per decision).

"Weight bytes" is what one decode step reads: every matrix once, the norms,
and the embedding table only when it doubles as the (float) LM head; a
token's embedding row is negligible. "Bandwidth achieved" = (weight bytes +
mean KV-cache bytes) x decode steps/s, next to the machine's measured read
bandwidth. Decode reads every weight once per token, so fewer bytes should
mean proportionally more tokens per second until something else (Python
overhead, attention, dequantization work) dominates: the table shows where
that happens.

Reading the perplexity column on SmolLM2: minfer's SmolLM2 weights come from
a Q4_1 GGUF file, i.e. every block of 32 inputs already holds at most 16
evenly spaced values. int4 with group size 32 therefore lands on the same grid
and reproduces them almost exactly (only its bf16 scale/min differ from the
file's f16 ones), while groups of 64 and 128 must fit two or four different
grids with one and lose much more: a checkpoint that has never been quantized
would not favour g32 this way. Lesson 06 shows it block by block.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from minfer.bench.machine import machine_info, measure_bandwidth
from minfer.bench.timing import interleaved, table, write_json

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
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per timed run (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--skip-ppl", action="store_true", help="do not measure perplexity")
    p.add_argument("--ppl-chars", type=int, default=None, help="characters of the perplexity text")
    p.add_argument("--json", nargs="?", const="bench_results/quant.json", default=None,
                   help="also write the results as JSON (default path bench_results/quant.json)")


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads (see the module docstring)."""
    from minfer.quant.linear import QuantizedLinear
    total = sum(m.weight_nbytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    emb = model.model.embed_tokens.weight
    head = getattr(model, "lm_head", None)         # None, or e.g. a prepacked tied head on emb
    head_is_embedding = model.cfg.tie_word_embeddings and (
        head is None or getattr(head, "weight", None) is emb)
    for name, p in model.named_parameters():
        if p is emb and not head_is_embedding:
            continue                                   # only one row per token is read
        total += p.numel() * p.element_size()
    return total


def model_bytes(model) -> int:
    """Bytes the model occupies (parameters and stored quantized tensors)."""
    from minfer.quant.linear import QuantizedLinear
    quant = sum(m.weight_nbytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    return quant + sum(p.numel() * p.element_size() for p in model.parameters())


def _build(name: str, cfg, state_dict, lm_head):
    from minfer.model import build_model
    from minfer.quant.apply import quantize_model
    if name in ("fp32", "float32"):
        return build_model(cfg, state_dict, dtype=torch.float32)
    if name in ("bf16", "bfloat16"):
        return build_model(cfg, state_dict, dtype=torch.bfloat16)
    return quantize_model(build_model(cfg, state_dict), name, lm_head=lm_head)


def _time_decode(model, prompt_ids, n) -> tuple[dict, list[int]]:
    from minfer.metrics import RequestStats
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    m = RequestStats(arrival_time=time.perf_counter())
    toks = list(generate_tokens(model, prompt_ids, params, metrics=m))
    m.finish_time = m.token_times[-1]
    return {"ttft": m.ttft, "decode_tps": 1.0 / m.tpot}, toks


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
    from minfer.checkpoints import load_checkpoint
    from minfer.eval.perplexity import perplexity, reference_text, text_fingerprint

    names = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not names:
        raise ValueError("--formats is empty")
    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be >= 2 to measure decode speed")
    lm_head = None if args.lm_head == "none" else args.lm_head
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    cfg, state_dict, tok = load_checkpoint(args.model)
    models = {name: _build(name, cfg, state_dict, lm_head) for name in names}
    del state_dict
    prompt_ids = tok.encode(PROMPT)
    n = args.max_tokens

    log(f"bench quant: {args.model}, formats {names}, LM head of quantized formats: {args.lm_head}; "
        f"{len(prompt_ids)} prompt tokens, {n} new tokens, batch 1, cpu, {args.repeats} interleaved rounds")
    bw = measure_bandwidth("cpu")
    tokens: dict[str, list[int]] = {}

    def timed(name):
        def run():
            res, toks = _time_decode(models[name], prompt_ids, n)
            tokens[name] = toks
            return res
        return run

    medians = interleaved({name: timed(name) for name in names}, repeats=args.repeats, warmup=1, log=log)

    ppl = {}
    text = None
    if not args.skip_ppl:
        text = reference_text(args.ppl_chars) if args.ppl_chars else reference_text()
        ids = tok.encode(text)
        for name in names:
            t0 = time.perf_counter()
            ppl[name] = perplexity(models[name], ids)
            log(f"  perplexity {name}: {ppl[name].perplexity:.4f} ({time.perf_counter() - t0:.0f} s)")

    base = "fp32" if "fp32" in names else names[0]
    rows = _rows(models, medians, tokens, ppl, base, prompt_ids, cfg, n, bw)

    print(table(rows, [("format", "format", "{:>10}"), ("weight_mb", "weights MB/step", "{:.1f}"),
                       ("decode_tps", "decode tok/s", "{:.1f}"), ("speedup", "x fp32", "{:.2f}"),
                       ("bandwidth_gbs", "GB/s", "{:.1f}"), ("bandwidth_fraction", "of measured", "{:.0%}"),
                       ("perplexity", "perplexity", "{:.3f}"), ("ppl_change", "ppl vs fp32", "{:+.2%}"),
                       ("greedy_agreement", "greedy =fp32", "{:.0%}"),
                       ("teacher_forced_agreement", "per-step =fp32", "{:.0%}")]))
    print(f"\nmachine: measured read bandwidth {bw / 1e9:.1f} GB/s; {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}")
    print(f"quantized formats: body as named, LM head {args.lm_head}; fast kernels compute in bfloat16")
    if text is not None:
        fp = text_fingerprint(text)
        r0 = ppl[names[0]]
        print(f"perplexity text: {fp['source']}, first {fp['chars']} chars, Python {fp['python']}, "
              f"sha256 {fp['sha256']}; windows of {r0.context} tokens, stride {r0.stride}, "
              f"{r0.scored_tokens} tokens scored")
    print(f"agreement: first {AGREEMENT_TOKENS} greedy tokens vs {base} (free-running / per step)")
    if args.json:
        write_json(args.json, {
            "benchmark": "quant", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info("cpu"), "model": args.model, "lm_head": args.lm_head,
            "prompt_tokens": len(prompt_ids), "new_tokens": n, "repeats": args.repeats,
            "measured_bandwidth_gbs": bw / 1e9,
            "perplexity_text": text_fingerprint(text) if text is not None else None,
            "results": rows,
        })
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
