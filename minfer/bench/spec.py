"""`minfer bench spec`: plain greedy decoding vs speculative methods, on tasks where they shine and where they do not.

Batch 1 per task, then the engine at ``--concurrency`` (``SpecDecodeEngine``); the columns: docs/measuring.md.
"""
import argparse
import time
from functools import partial

import torch

from minfer.bench.report import TABLES
from minfer.bench.timing import (add_run_args, interleaved, log, names, positive_ints, table, timed_generate,
                                 write_json)
from minfer.cli_args import add_model_args, int_in, set_threads

CODE = '''def summarize_orders(orders, tax_rate=0.08):
    """Return the subtotal, tax and total of a list of orders."""
    subtotal = 0.0
    for order in orders:
        price = order["price"]
        quantity = order.get("quantity", 1)
        if order.get("discount"):
            price = price * (1 - order["discount"])
        subtotal += price * quantity
    tax = subtotal * tax_rate
    total = subtotal + tax
    return {"subtotal": round(subtotal, 2), "tax": round(tax, 2), "total": round(total, 2)}'''

DOCUMENT = (
    "The Harbor Library opened in 1923 in a former customs house near the old port. "
    "Its first librarian, Margaret Ellison, bought the founding collection of 4,000 books with money "
    "raised by local fishermen. In 1961 a fire destroyed the east wing, and more than a thousand books "
    "were lost. The wing was rebuilt in 1964 with a reading room that faces the sea. "
    "Today the library lends about 90,000 items a year and runs a free reading program for children "
    "every Saturday morning. The building is open from 9 a.m. to 7 p.m. on weekdays and from 10 a.m. "
    "to 4 p.m. on Saturdays; it is closed on Sundays.")

# name -> (kind, user message, start of the assistant's answer). Starting the answer for the
# model ("prefilling" the response, as API users do) keeps a 135M model quoting instead of
# paraphrasing; doc-answer asks the same question without it.
TASKS = {
    "code-edit": ("grounded", "Here is a Python function:\n\n```python\n" + CODE + "\n```\n\n"
                  "Repeat the function exactly, changing only its docstring to \"Add up a list of orders.\"",
                  "```python\n"),
    "doc-quote": ("grounded", "Read this document:\n\n" + DOCUMENT + "\n\nWhat happened in 1961, and when is "
                  "the library open? Answer by quoting the relevant sentences of the document word for word.",
                  'According to the document: "'),
    "doc-answer": ("grounded", "Read this document:\n\n" + DOCUMENT + "\n\nWhat happened in 1961, and when is "
                   "the library open?", ""),
    "story": ("free-form", "Write a short story about a lighthouse keeper who finds a message in a bottle.", ""),
}
DEFAULT_METHODS = "plain,prompt_lookup,prompt_lookup:adaptive=0,draft:layers-8,gamma=3,draft:int4,gamma=3,lookahead"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--max-tokens", type=int_in(2), default=160, help="new tokens at most (default 160)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="methods separated by ';' or by ',' before a method name; 'plain' is always added "
                        f"(default: {DEFAULT_METHODS})")
    p.add_argument("--prepack", action="store_true",
                   help="every method on oneDNN-prepacked linears (minfer/kernels/onednn_linear.py)")
    p.add_argument("--concurrency", default="1,8",
                   help="concurrent requests for the engine comparison, comma-separated; '' skips it (default 1,8)")
    add_run_args(p, "spec", repeats=3)


def split_methods(text: str) -> list[str]:
    """'plain,prompt_lookup:k=8,max=3,lookahead' -> ['plain', 'prompt_lookup:k=8,max=3', 'lookahead']."""
    from minfer.speculative import METHODS
    out: list[str] = []
    for part in names(text.replace(";", ","), "--methods"):
        if part == "plain" or part.split(":")[0] in METHODS or not out:       # a method starts here
            out.append(part)
        else:
            out[-1] += "," + part                   # an option of the previous method
    if "plain" not in out:
        out.insert(0, "plain")
    return out


def run_once(model, prompt_ids, params, eos, method, draft):
    """Generate once -> (the timing numbers, (the tokens, the SpecStats: None for plain))."""
    from minfer.speculative import SpecStats, generate_speculative
    if method == "plain":
        res, toks = timed_generate(model, prompt_ids, params, eos_token_ids=eos)
        return res, (toks, None)
    stats = SpecStats()
    res, toks = timed_generate(model, prompt_ids, params, generate_speculative, config=method, draft=draft,
                               eos_token_ids=eos, stats=stats)
    return res, (toks, stats)


def _engine_run(llm, batch: list, params) -> tuple[dict, tuple[list, int]]:
    """One ``generate`` of the batch -> ({"tok_s"}, (its outputs, the engine steps it took))."""
    before, t0 = llm.engine.num_steps, time.perf_counter()
    outs = llm.generate(batch, params)
    tok_s = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
    return {"tok_s": tok_s}, (outs, llm.engine.num_steps - before)


def engine_rows(llm, configs: dict, drafts: dict, prompts: list, params, concurrency: list[int],
                repeats: int, log) -> list[dict]:
    """The plain engine vs each method's ``SpecDecodeEngine`` on c concurrent requests (see the docstring)."""
    from minfer.llm import LLM
    engines = {"plain": LLM.from_model(llm.model, llm.tokenizer)}
    for m, c in configs.items():
        if c.method != "lookahead":                   # lookahead runs only as a single-request loop
            engines[m] = LLM.from_model(llm.model, llm.tokenizer, speculative=c, draft=drafts.get(m))
    rows = []
    for conc in concurrency:
        batch = [prompts[i % len(prompts)] for i in range(conc)]
        log(f"engine, {conc} concurrent requests")
        out: dict = {}                              # name -> (outputs, engine steps)
        med = interleaved({name: partial(_engine_run, e, batch, params) for name, e in engines.items()},
                          repeats=repeats, warmup=1, log=log, outputs=out)
        plain_ids = [o.token_ids for o in out["plain"][0]]
        for name, (outs, steps) in out.items():
            stats = [o.spec_stats for o in outs if o.spec_stats is not None and o.spec_stats.num_steps]
            rows.append({"concurrency": conc, "method": name, "tok_s": med[name]["tok_s"],
                         "speedup": med[name]["tok_s"] / med["plain"]["tok_s"], "forwards": steps,
                         "tokens_per_forward": (sum(s.mean_accepted_length for s in stats) / len(stats))
                         if stats else 1.0,
                         "identical": [o.token_ids for o in outs] == plain_ids})
    return rows


def main(args) -> int:
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams
    from minfer.speculative import SpeculativeConfig, load_draft

    tasks, methods = names(args.tasks, "--tasks", TASKS), split_methods(args.methods)
    concurrency = positive_ints(args.concurrency, "--concurrency") if args.concurrency.strip() else []
    set_threads(args.threads)
    configs = {m: SpeculativeConfig.parse(m) for m in methods if m != "plain"}   # fail early on a bad spec
    llm = LLM(args.model, device=args.device, dtype=args.dtype, prepack=args.prepack)
    model, tok = llm.model, llm.tokenizer
    drafts = {m: load_draft(model, c.draft_model) for m, c in configs.items() if c.method == "draft"}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    eos = list(tok.eos_token_ids)
    log(f"bench spec: {args.model}, device {llm.device}, {llm.dtype}, batch 1, greedy, "
        f"max {args.max_tokens} new tokens, {args.repeats} interleaved rounds, threads {torch.get_num_threads()}"
        f"{', prepacked linears' if args.prepack else ''}")

    rows, prompts = [], []
    for task in tasks:
        kind, text, answer_start = TASKS[task]
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}],
                                                        add_generation_prompt=True) + answer_start)
        prompts.append(prompt_ids)
        log(f"task {task} ({kind}): {len(prompt_ids)} prompt tokens")
        runs = {m: partial(run_once, model, prompt_ids, params, eos, m, drafts.get(m)) for m in methods}
        out: dict = {}
        med = interleaved(runs, repeats=args.repeats, warmup=1, log=log, outputs=out)
        for m in methods:
            toks, st = out[m]
            rows.append({
                "task": task, "kind": kind, "method": m, "new_tokens": len(toks),
                "decode_tps": med[m]["decode_tps"], "ttft": med[m]["ttft"],
                "speedup": med[m]["decode_tps"] / med["plain"]["decode_tps"],
                "identical": toks == out["plain"][0],
                "acceptance_rate": st.acceptance_rate if st else None,
                "per_token_acceptance": st.per_token_acceptance if st else None,
                "tokens_per_forward": st.mean_accepted_length if st else 1.0,
                "theory_tokens_per_forward": st.expected_mean_length() if st else None,
                "histogram": st.histogram() if st else {},        # JSON: the keys become strings
            })
        log("  output (plain): " + repr(tok.decode(out["plain"][0])[:160]))
    print(table(rows, TABLES["spec"][0][2] + [("new_tokens", "tokens", "{}")]))
    print("\ntok/fwd: tokens emitted per target forward (measured); theory: mean over steps of "
          "(1 - a^(k+1)) / (1 - a) at the measured per-token acceptance a")
    batched = engine_rows(llm, configs, drafts, prompts, params, concurrency, args.repeats, log) if concurrency else []
    if batched:
        print("\n" + table(batched, [("concurrency", "requests", "{}"), ("method", "method", "{}"),
                                     ("tok_s", "tok/s", "{:.1f}"), ("speedup", "x plain engine", "{:.2f}"),
                                     ("forwards", "forwards", "{}"), ("tokens_per_forward", "tok/fwd", "{:.2f}"),
                                     ("identical", "same", "{}")]))
        print("\nengine rows: end-to-end tok/s of all requests (prefill included), one forward per engine step; "
              "figures from a shared machine are noisy, only the ratios of one run compare")
    write_json(args.json, {
        "benchmark": "spec", "device": str(llm.device), "model": args.model, "dtype": str(llm.dtype),
        "max_tokens": args.max_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "results": rows, "engine": batched,
    })
    return 0
