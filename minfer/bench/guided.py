"""`minfer bench guided`: what the grammar's token mask costs per engine step, against an unguided step
(docs/measuring.md).
"""
import argparse
import statistics
import time

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
          "city": {"type": "string", "maxLength": 24}, "admin": {"type": "boolean"}},
          "required": ["name", "age", "city", "admin"], "additionalProperties": False}


def step_times(engine, prompt, params_list) -> tuple[list[float], list[float]]:
    """Run one request per params together -> (ms per step, ms of the mask per step)."""
    import minfer.engine.llm_engine as le
    masks, mask = [], le.mask_logits

    def timed(logits, matchers):
        t = time.perf_counter()
        out = mask(logits, matchers)
        masks.append((time.perf_counter() - t) * 1e3)
        return out
    le.mask_logits, steps = timed, []
    try:
        for sp in params_list:
            engine.add_request(prompt, sp)
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            steps.append((time.perf_counter() - t) * 1e3)
    finally:
        le.mask_logits = mask
    return steps[1:], masks[1:]                        # the first step is the prefill


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args, int_list
    add_model_args(p)
    p.add_argument("--batches", type=lambda s: int_list(s, "--batches"), default=[1, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", nargs="?", const="docs/bench/guided.json", default=None)


def main(args) -> int:
    from minfer.bench.report import TABLES
    from minfer.bench.timing import table, write_json
    from minfer.cli_args import set_threads
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams
    set_threads(args.threads)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=max(args.batches))
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Describe a person as a JSON object."}])
    rows = []
    for b in args.batches:
        guided = [SamplingParams(temperature=0.8, seed=i, max_tokens=64, guided_json=SCHEMA) for i in range(b)]
        steps, masks = step_times(llm.engine, prompt, guided)
        n = len(steps) + 1
        free, _ = step_times(llm.engine, prompt, [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True)
                                                  for i in range(b)])
        mask_ms, step_ms, free_ms = (statistics.median(x) for x in (masks, steps, free))
        rows.append({"batch": b, "mask_ms": mask_ms, "guided_step_ms": step_ms, "unguided_step_ms": free_ms,
                     "mask_ratio": mask_ms / free_ms, "step_ratio": step_ms / free_ms, "steps": n})
    print(table(rows, TABLES["guided"][0][2]))
    write_json(args.json, {"benchmark": "guided", "model": args.model, "schema": SCHEMA, "rows": rows,
                           "threads": args.threads})
    return 0
