"""`minfer eval perplexity`: how well a model (optionally quantized) predicts a fixed text.

    minfer eval perplexity --model smollm2-135m-instruct --quantization int8
"""
import argparse
import os
import sys
import time
from pathlib import Path

from minfer.cli_args import add_model_args, int_in, positive_int
from minfer.eval.perplexity import DEFAULT_CHARS, DEFAULT_CONTEXT, DEFAULT_STRIDE


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_cmd", required=True)
    q = sub.add_parser("perplexity", help="sliding-window perplexity on a slice of pydoc_data.topics")
    add_model_args(q)
    q.add_argument("--quantization", default=None,
                   help="int8 | int4 | int4-gN | q8_0 | q4_0 | q4_1 (default: none)")
    q.add_argument("--path", default="auto", choices=["auto", "reference", "fast"],
                   help="quantized matmul: fused kernel where torch has one (auto), or dequantize + matmul")
    q.add_argument("--chars", type=positive_int, default=DEFAULT_CHARS,
                   help=f"characters of the text (default {DEFAULT_CHARS})")
    q.add_argument("--context", type=int_in(2), default=DEFAULT_CONTEXT,
                   help=f"window length in tokens (default {DEFAULT_CONTEXT})")
    q.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE,
                   help=f"tokens between window starts (default {DEFAULT_STRIDE})")
    q.add_argument("--json", nargs="?", const="bench_results/perplexity.json", default=None,
                   help="also write the result as JSON")


def main(args) -> int:
    from minfer.eval.perplexity import perplexity, reference_text, text_fingerprint
    from minfer.llm import LLM
    from minfer.quant.apply import describe

    chars, context, stride = args.chars, args.context, args.stride        # checked before the model loads
    if stride >= context:
        raise ValueError(f"--stride ({stride}) must be smaller than --context ({context})")
    if args.json and (Path(args.json).is_dir() or str(args.json).endswith(os.sep)):
        raise ValueError(f"--json {args.json} is a folder; give a file name such as {args.json.rstrip(os.sep)}"
                         f"{os.sep}perplexity.json")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization)
    if args.path != "auto":
        from minfer.quant.linear import QuantizedLinear
        for m in llm.model.modules():
            if isinstance(m, QuantizedLinear):
                m.path = args.path
    text = reference_text(chars)
    ids = llm.tokenizer.encode(text)
    t0 = time.perf_counter()
    r = perplexity(llm.model, ids, context=context, stride=stride)
    secs = time.perf_counter() - t0
    fp = text_fingerprint(text)
    quant = describe(llm.model)
    print(f"perplexity {r.perplexity:.4f}  (nll {r.nll:.4f} nats/token)  model {args.model}, "
          f"{llm.dtype}, quantization {quant}")
    print(f"text: {fp['source']}, first {fp['chars']} chars, Python {fp['python']}, sha256 {fp['sha256']}; "
          f"{len(ids)} tokens, {r.scored_tokens} scored in {r.windows} windows of {context} "
          f"(stride {stride}); {secs:.1f} s", file=sys.stderr)
    if args.json:
        from minfer.bench.machine import machine_info
        from minfer.bench.timing import write_json
        write_json(args.json, {"eval": "perplexity", "model": args.model, "dtype": str(llm.dtype),
                               "quantization": quant, "text": fp, "tokens": len(ids),
                               "seconds": secs, **r.to_dict(), "machine": machine_info(llm.device)})
    return 0
