"""The `minfer` command line. Each subcommand is a thin wrapper over the library.

    minfer generate "PROMPT" [--chat] [--model M] [--max-tokens N] ...   stream a completion
    minfer chat [--model M]                                              interactive chat
    minfer weights list | fetch NAME                                     the model registry
    minfer bench decode [--model M] [--json]                             naive vs cached vs transformers
    minfer lessons student-edition OUT_DIR                               notebooks without solutions
"""
from __future__ import annotations

import argparse
import os
import sys

from minfer.cli_args import add_model_args


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--attention", default="sdpa", help="attention backend: sdpa | reference | flash")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="KV pages: auto (the model's dtype) | int8 | fp8 (quantized, one scale per token and head)")
    p.add_argument("--quantization", default=None,
                   help="weight-only quantization: int8 | int4 | int4-gN | q8_0 | q4_0 | q4_1 (default: none)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args):
    from minfer.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)


def _llm(args):
    from minfer.llm import LLM
    return LLM(args.model, device=args.device, dtype=args.dtype, attention=args.attention,
               kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
               speculative=getattr(args, "speculative", None))


def _print_timing(out) -> None:
    m = out.metrics
    tpot = f"{m.tpot * 1000:.1f} ms" if m.tpot else "n/a"
    tps = f"{m.decode_tokens_per_s:.1f}" if m.decode_tokens_per_s else "n/a"
    print(f"\n[{m.num_prompt_tokens} prompt tokens, {m.num_output_tokens} new, finish={out.finish_reason}] "
          f"TTFT {m.ttft * 1000:.0f} ms | TPOT {tpot} | decode {tps} tokens/s", file=sys.stderr)


def cmd_generate(args) -> int:
    params = _sampling(args)
    llm = _llm(args)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.chat:
        out = llm.stream_chat([{"role": "user", "content": args.prompt}], params, on_text=show)
    else:
        out = llm.stream(args.prompt, params, on_text=show)
    sys.stdout.write("\n")
    _print_timing(out)
    if out.spec_stats is not None:                # --speculative: how much the verifier accepted
        s = out.spec_stats
        rate = "n/a" if s.acceptance_rate is None else f"{s.acceptance_rate:.0%}"
        print(f"[speculative {args.speculative}] {s.num_steps} target forwards, acceptance {rate}, "
              f"{s.mean_accepted_length or 0:.2f} tokens per forward, accepted-length histogram "
              f"{s.histogram()}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("minfer chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        out = llm.stream_chat(messages, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": out.text})
        _print_timing(out)


def cmd_weights(args) -> int:
    from minfer.checkpoints import fetch, list_models
    if args.weights_cmd == "fetch":
        path = fetch(args.name, force=args.force)
        print(path)
        return 0
    rows = list_models()
    print(f"{'name':28} {'fetched':8} description")
    for r in rows:
        print(f"{r['name']:28} {'yes' if r['fetched'] else 'no':8} {r['description']}")
        if r["fetched"]:
            print(f"{'':37}{r['path']}")
    return 0


# Subcommands that live in their own modules: each module defines
# `add_arguments(parser)` and `main(args) -> int`. Entries whose module is not
# there yet are simply not offered.
BENCHES = {
    "decode": ("minfer.bench.decode", "prefill/decode speed: naive vs cached vs transformers"),
    "attention": ("minfer.bench.attention", "decode attention with GQA: K/V repeated vs enable_gqa vs heads folded"),
    "kv": ("minfer.bench.kv", "paged vs contiguous KV: capacity, fragmentation, prefix-cache TTFT"),
    "quant": ("minfer.bench.quant", "weight bytes, decode tok/s and perplexity per quantization format"),
    "spec": ("minfer.bench.spec", "speculative decoding, prompt lookup, lookahead vs plain decoding"),
    "serve": ("minfer.bench.serve", "serving policies under a workload: TTFT, TPOT, goodput"),
}
COMMANDS = {
    "quantize": ("minfer.quant.cli", "quantize a model's weights and save them"),
    "eval": ("minfer.eval.cli", "quality evaluations (perplexity)"),
    "batch": ("minfer.serving.batch_job", "offline batch job over an OpenAI-style JSONL file"),
}


def _run_module(args) -> int:
    import importlib
    return importlib.import_module(args.module).main(args) or 0


def _add_module_commands(sub, table: dict) -> None:
    import importlib
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_run_module, module=module)


def cmd_lessons(args) -> int:
    from minfer.lessons.notebooks import student_edition_main
    return student_edition_main(args.out_dir) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="stream a completion for one prompt")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.add_argument("--speculative", default=None,
                   help="speculative decoding: prompt_lookup[:k=N,min=N,max=N,adaptive=0|1] | draft:<model>|layers-K|int4"
                        "[,gamma=N] | lookahead[:W=N,N=N,G=N] (greedy only); output unchanged")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("weights", help="list or fetch model weights")
    wsub = p.add_subparsers(dest="weights_cmd", required=True)
    wsub.add_parser("list", help="known models and whether they are fetched")
    f = wsub.add_parser("fetch", help="download and convert a registry model")
    f.add_argument("name")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("bench", help="benchmarks (commands, never tests)")
    _add_module_commands(p.add_subparsers(dest="bench_cmd", required=True), BENCHES)
    _add_module_commands(sub, COMMANDS)

    p = sub.add_parser("lessons", help="lesson tools for instructors")
    lsub = p.add_subparsers(dest="lessons_cmd", required=True)
    s = lsub.add_parser("student-edition", help="write the notebooks with solution cells emptied")
    s.add_argument("out_dir")
    p.set_defaults(func=cmd_lessons)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:      # bad input: one clear line, no traceback
        if os.environ.get("MINFER_DEBUG"):
            raise
        print(f"minfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
