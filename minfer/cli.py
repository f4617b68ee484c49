"""The `minfer` command line: each subcommand is a thin wrapper over the library (``minfer CMD --help``).

Exit codes: 0 done; 2 a bad argument or input (one line ``minfer: error: ...``); 1 an internal
error (a bug: please report it; ``--debug`` shows the traceback); 130 interrupted (Ctrl-C).
"""
import argparse
import importlib
import os
import sys
import traceback

from minfer.cli_args import add_model_args, add_parallel_args
from minfer.validation import KV_CACHE_DTYPES


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ``minfer: error: ...`` (exit 2), like every other
    expected failure; ``minfer CMD --help`` still shows the usage."""

    def error(self, message: str):
        sub = self.prog.partition(" ")[2]
        self.exit(2, f"minfer: error: {sub + ': ' if sub else ''}{message} (see `{self.prog} --help`)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_parallel_args(p)
    p.add_argument("--attention", default="sdpa", help="attention backend: sdpa | reference | flash")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV pages: auto (the model's dtype) | int8 | fp8 (quantized, one scale per token and head)")
    p.add_argument("--quantization", default=None,
                   help="weight-only quantization: int8 | int4 | int4-gN | q8_0 | q4_0 | q4_1 (default: none)")
    p.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU, float32 or bf16: oneDNN linears on weights reordered once, for every row count (2x "
                        "weight memory); default: every row count in bf16, in float32 the engine's batched steps "
                        "(4-128 rows) only; --no-prepack: off")
    p.add_argument("--decode-kernel", default="auto", choices=["auto", "torch", "cpu", "triton"],
                   help="how eager decode steps read the paged KV pool: auto (the C++ kernel on a CPU in float32 or bf16 when it builds, "
                        "else torch) | torch (gather + SDPA) | cpu (the C++ kernel) | triton (the Triton kernel)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args):
    import re
    from minfer.sampling import SamplingParams
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    except ValueError as e:                       # name the option the user typed
        raise ValueError(re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m[1].replace("_", "-"),
                                str(e))) from None


def _llm(args, **engine_args):
    from minfer.llm import LLM
    if getattr(args, "compile", False) or getattr(args, "enforce_eager", False):
        engine_args.update(compile=args.compile, enforce_eager=True if args.enforce_eager else None)
    return LLM(args.model, device=args.device, dtype=args.dtype, attention=args.attention, **engine_args,
               kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
               speculative=getattr(args, "speculative", None), tensor_parallel_size=args.tensor_parallel_size,
               pipeline_parallel_size=args.pipeline_parallel_size, prepack=args.prepack,
               decode_kernel=args.decode_kernel)


def _print_timing(out) -> None:
    m = out.metrics
    tpot = f"{m.tpot * 1000:.1f} ms" if m.tpot else "n/a"
    tps = f"{m.decode_tokens_per_s:.1f}" if m.decode_tokens_per_s else "n/a"
    print(f"\n[{m.num_prompt_tokens} prompt tokens, {m.num_output_tokens} new, finish={out.finish_reason}] "
          f"TTFT {m.ttft * 1000:.0f} ms | TPOT {tpot} | decode {tps} tokens/s", file=sys.stderr)


def cmd_generate(args) -> int:
    params = _sampling(args)
    llm = _llm(args, max_num_seqs=1)             # one prompt: one bucket to compile or capture
    if args.compile:                              # measured at start-up, apart from every step
        print(f"[compile] torch.compile of the decode step: {llm.compile_seconds:.1f} s at start-up "
              f"(not in TTFT/TPOT below)", file=sys.stderr)
    if llm.capture_seconds:
        print(f"[cuda graphs] captured in {llm.capture_seconds:.1f} s at start-up", file=sys.stderr)
    if args.use_solutions:                        # the learner's functions at the engine's swap points
        from minfer.lessons.commands import with_solutions
        with with_solutions(llm, args.use_solutions) as llm:
            return _stream(args, llm, params)
    return _stream(args, llm, params)


def _show(piece: str) -> None:
    print(piece, end="", flush=True)


def _stream(args, llm, params) -> int:
    if args.chat:
        out = llm.stream_chat([{"role": "user", "content": args.prompt}], params, on_text=_show)
    else:
        out = llm.stream(args.prompt, params, on_text=_show)
    sys.stdout.write("\n")
    _print_timing(out)
    if out.spec_stats is not None:                # --speculative: how much the verifier accepted
        s = out.spec_stats
        rate = "n/a" if s.acceptance_rate is None else f"{s.acceptance_rate:.0%}"
        print(f"[speculative {args.speculative}] {s.num_steps} target forwards, acceptance {rate}, "
              f"{s.mean_accepted_length or 0:.2f} tokens per forward, accepted-length histogram "
              f"{s.histogram()}", file=sys.stderr)
    return 0


def trim_history(messages: list[dict], count_tokens, budget: int) -> tuple[list[dict], int]:
    """Drop the oldest turns (never the system prompt or the last message) until ``count_tokens(messages)
    <= budget`` -> (messages, number dropped); ValueError if those two alone are over budget."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    dropped = 0
    while count_tokens(head + body) > budget:
        if len(body) <= 1:
            raise ValueError(f"this message does not fit in the model's context ({budget} tokens with the "
                             f"system prompt); send a shorter one")
        cut = 2 if len(body) > 2 and body[0]["role"] == "user" else 1   # a user turn and its answer
        body, dropped = body[cut:], dropped + cut
    return head + body, dropped


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if llm.tokenizer.chat_template is None:
        raise ValueError(f"{args.model}: this model has no chat template; use `minfer generate` instead")
    context = llm.config.max_position_embeddings
    budget = max(context - params.max_tokens, context // 2)   # leave room for the answer

    def count(msgs):
        return len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)))

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
        try:
            messages, dropped = trim_history(messages + [{"role": "user", "content": line}], count, budget)
        except ValueError as e:                   # refuse this turn, keep the conversation
            print(f"minfer chat: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"[minfer chat: the conversation outgrew the {context}-token context; dropped the "
                  f"{dropped} oldest message(s){', kept the system prompt' if args.system else ''}]",
                  file=sys.stderr)
        sys.stdout.write("assistant> ")
        out = llm.stream_chat(messages, params, on_text=_show)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": out.text})
        _print_timing(out)


def cmd_weights(args) -> int:
    from minfer.checkpoints import fetch, list_models
    if args.weights_cmd == "fetch":
        print(fetch(args.name, force=args.force))
        return 0
    print(f"{'name':28} {'fetched':8} description")
    for r in list_models():
        print(f"{r['name']:28} {'yes' if r['fetched'] else 'no':8} {r['description']}")
        if r["fetched"]:
            print(f"{'':37}{r['path']}")
    return 0


# Subcommands that live in their own modules: each defines `add_arguments(parser)` and `main(args) -> int`.
BENCHES = {
    "decode": ("minfer.bench.decode", "prefill/decode speed: naive vs cached vs transformers"),
    "attention": ("minfer.bench.attention", "decode attention with GQA: K/V repeated vs enable_gqa vs heads folded"),
    "kv": ("minfer.bench.kv", "paged vs contiguous KV: capacity, fragmentation, prefix-cache TTFT"),
    "hybrid": ("minfer.bench.hybrid", "local/global models: KV bytes per token, hybrid vs full cache"),
    "quant": ("minfer.bench.quant", "weight bytes, decode tok/s and perplexity per quantization format"),
    "spec": ("minfer.bench.spec", "speculative decoding, prompt lookup, lookahead vs plain decoding"),
    "serve": ("minfer.bench.serve", "serving policies under a workload: TTFT, TPOT, goodput"),
    "parallel": ("minfer.bench.parallel", "2 ranks vs 1: TP comm per token, PP bubble, disaggregated vs colocated"),
    "evict": ("minfer.bench.evict", "KV-cache eviction (sinks, H2O, SnapKV): perplexity vs budget"),
    "guided": ("minfer.bench.guided", "structured output: the grammar's token mask per step vs an unguided step"),
    "report": ("minfer.bench.report", "write docs/benchmarks.md from the benchmarks' JSON files"),
}
COMMANDS = {
    "quantize": ("minfer.compress.quantize_cli", "quantize a model's weights and save them"),
    "eval": ("minfer.bench.perplexity", "quality evaluations (perplexity)"),
    "batch": ("minfer.serving.batch_job", "offline batch job over an OpenAI-style JSONL file"),
    "serve": ("minfer.serving.server", "OpenAI-compatible HTTP server (streaming, /metrics)"),
    "router": ("minfer.serving.router", "route OpenAI API requests over engine replicas"),
    "teacher-cache": ("minfer.compress.teacher",
                      "cache a teacher's top-k log-probs and hidden states over the corpus"),
    "distill": ("minfer.compress.distill", "train a small draft model on the teacher cache (distillation)"),
    "medusa": ("minfer.compress.medusa", "Medusa heads: train on the teacher cache"),
    "prune": ("minfer.bench.prune", "structured pruning (FFN channels, heads) + healing by distillation"),
}


def _run_module(args) -> int:
    return importlib.import_module(args.module).main(args) or 0


def _add_module_commands(sub, table: dict) -> None:
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_run_module, module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: MINFER_DEBUG=1)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="stream a completion for one prompt")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.add_argument("--speculative", default=None,
                   help="speculative decoding: prompt_lookup[:k=N,min=N,max=N,adaptive=0|1] | draft:<model>|layers-K|int4"
                        "[,gamma=N] | lookahead[:W=N,N=N,G=N] (greedy only); output unchanged")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (static shapes; compile time printed apart; "
                        "slower on a 2-core CPU)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eager (default: CUDA graphs on a GPU, eager on a CPU)")
    p.add_argument("--pipeline-parallel", action="store_true",
                   help="under torchrun: split the layers into one stage per process (default: tensor parallel)")
    p.add_argument("--use-solutions", default=None, metavar="NOTEBOOK",
                   help="run the engine with the functions you wrote in this lesson notebook "
                        "(see minfer.lessons.swap for where they plug in)")
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

    from minfer.lessons.commands import add_lessons_commands
    add_lessons_commands(sub.add_parser("lessons", help="lessons: your copy, handouts, grading"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command (see ``_run``); after a lost rank, end the process here (``exit_now``)."""
    code = _run(argv)
    for driver in getattr(sys.modules.get("minfer.distributed.runtime"), "DRIVERS", []):
        driver.shutdown()                           # --tensor/pipeline-parallel-size: end the workers it started
    comm = sys.modules.get("minfer.distributed.comm")
    if comm is not None and comm.peer_lost():       # a broken process group can abort at teardown
        comm.exit_now(code)
    return code


def _run(argv: list[str] | None) -> int:
    """Run one command. The error boundary: an expected failure prints one line ``minfer: error: ...``
    and returns 2; anything else is a bug: "internal error, please report" (traceback with --debug), 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("MINFER_DEBUG"))    # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:   # started by torchrun
        if args.cmd != "generate":
            print(f"minfer: error: under torchrun only `minfer generate` runs (got {args.cmd!r})", file=sys.stderr)
            return 2
        from minfer.distributed.runtime import torchrun_main
        return torchrun_main(args)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("minfer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                        # noqa: BLE001 - the boundary of the program
        if debug:
            traceback.print_exc()
        from minfer.checkpoints.fetch import DownloadError
        if isinstance(e, (ValueError, OSError, MemoryError, DownloadError)):    # what a user can cause
            print(f"minfer: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"minfer: internal error, please report it with the command you ran: "
              f"{type(e).__name__}: {_one_line(e)}"
              f"{'' if debug else '; rerun with --debug for the traceback'}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (OSError: "strerror: filename")."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
