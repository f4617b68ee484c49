"""`minfer prune`: prune SmolLM2 (``minfer/compress/prune.py``), heal it by distillation, and measure
decode speed and perplexity against the dense model and unstructured sparsity of the same ratio."""
import argparse
from pathlib import Path

import torch

from minfer.bench.timing import add_run_args
from minfer.cli_args import float_list
from minfer.compress.prune import magnitude_sparsify, prune_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args
    add_model_args(p)
    p.add_argument("--cache", default="weights/compress/teacher")
    p.add_argument("--ffn-ratios", default="0.25,0.5", help="fractions of FFN channels to remove (comma-separated)")
    p.add_argument("--heads-per-group", type=int, default=0, help="also remove this many query heads per K/V group")
    p.add_argument("--heal-minutes", type=float, default=2.0, help="healing budget per pruned model (0: none)")
    p.add_argument("--max-tokens", type=int, default=48, help="decode tokens per timing run")
    p.add_argument("--ppl-chars", type=int, default=4000, help="characters of the pydoc perplexity text")
    p.add_argument("--out", default="weights/compress/pruned", help="folder for the healed HF checkpoints")
    add_run_args(p, "prune", repeats=3, threads=1)


def main(args) -> int:
    import copy
    from functools import partial

    from minfer.bench.timing import interleaved, log, table, timed_generate, write_json
    from minfer.cli_args import set_threads
    from minfer.compress.distill import save_student, train
    from minfer.compress.teacher import TeacherCache
    from minfer.eval.perplexity import perplexity, reference_text
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams

    set_threads(args.threads)
    ratios = float_list(args.ffn_ratios, "--ffn-ratios")
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=False)
    dense, tok = llm.model, llm.tokenizer
    train_cache, heldout = TeacherCache(Path(args.cache) / "train"), TeacherCache(Path(args.cache) / "heldout")
    calib = train_cache.batch(range(4)).tokens                           # calibration: training text only
    ppl_ids = tok.encode(reference_text(args.ppl_chars))                 # pydoc: never trained on
    ppl = lambda m: perplexity(m, ppl_ids, context=256, stride=128).perplexity  # noqa: E731
    models = {"dense": dense}
    for r in ratios:
        models[f"structured ffn {r:.0%}" + (f" -{args.heads_per_group}h/grp" if args.heads_per_group else "")] = \
            prune_model(dense, calib, r, args.heads_per_group)[0]
        models[f"unstructured ffn {r:.0%}"] = magnitude_sparsify(copy.deepcopy(dense), r)
    prompt = tok.encode(reference_text(600)[-300:])
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    log("timing decode, interleaved ...")
    med = interleaved({n: partial(timed_generate, m, prompt, params) for n, m in models.items()},
                      repeats=args.repeats, warmup=1, log=log, outputs={})
    rows = []
    for name, m in models.items():
        row = {"model": name, "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
               "nonzero_M": sum(int((p != 0).sum()) for p in m.parameters()) / 1e6,
               "decode_tps": med[name]["decode_tps"], "speedup": med[name]["decode_tps"] / med["dense"]["decode_tps"],
               "ppl_before": ppl(m), "ppl_healed": None}
        if name.startswith("structured") and args.heal_minutes > 0:
            log(f"healing {name} for {args.heal_minutes} min ...")
            curve = train(m, train_cache, heldout, minutes=args.heal_minutes, batch=1, lr=2e-4,
                          eval_every=10 ** 9, log=log)
            row["ppl_healed"] = ppl(m)
            row["heal_steps"] = curve[-1]["step"]
            save_student(m, Path(args.out) / name.replace(" ", "_").replace("%", "pct").replace("/", ""),
                         args.model, curve)
        rows.append(row)
        log(str(row))
    print(table(rows, [("model", "model", "{}"), ("params_M", "params M", "{:.1f}"), ("nonzero_M", "nonzero M", "{:.1f}"),
                       ("decode_tps", "tok/s", "{:.1f}"), ("speedup", "x dense", "{:.2f}"),
                       ("ppl_before", "ppl", "{:.2f}"), ("ppl_healed", "ppl healed", "{:.2f}")]))
    print(f"\nperplexity: first {args.ppl_chars} chars of pydoc_data.topics (never trained on), context 256, stride 128; "
          f"threads {torch.get_num_threads()}; shared machine")
    write_json(args.json, {"benchmark": "prune", "rows": rows, "args": {k: v for k, v in vars(args).items()
                                                                          if isinstance(v, (int, float, str))}})
    return 0
