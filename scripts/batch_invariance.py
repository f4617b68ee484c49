"""Where do a sequence's numbers change when other sequences share its steps?

Runs ``bench serve``'s trace (SmolLM2, the text dataset) three ways: one by one through ``generate_tokens``
(the bench's "sequential" reference), through the engine one request at a time, and through the engine
with every request at once. For the first request whose greedy tokens differ batched vs alone (or
``--request``), it records every op's output rows (each decoder layer's modules) at each of its positions
and prints the first (position, layer, op) where two runs differ bit for bit.

    PYTHONPATH=$PWD python scripts/batch_invariance.py --dtype bfloat16 [--batch-invariant] [--requests 32]
"""
import argparse
import gc
import math

import torch

from minfer.engine import runner as runner_mod
from minfer.engine.llm_engine import LLMEngine, run_trace
from minfer.generate import generate_tokens
from minfer.llm import LLM
from minfer.sampling import SamplingParams
from minfer.serving.workload import text_trace


class Recorder:
    """Forward hooks: every decoder-layer module's output rows of one request, keyed by position."""

    def __init__(self, model, target: str | None):
        self.target, self.rows, self.by_pos = target, None, {}
        self.model = model
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        for i, layer in enumerate(model.model.layers):          # every op's output, in the order they run
            for name, m in [("", layer)] + list(layer.named_modules())[1:]:
                m.register_forward_hook(lambda m, a, out, key=(i, name or "layer"): self._layer(key, out))
        self._orig = runner_mod.prepare_batch
        runner_mod.prepare_batch = self._prepare

    def _prepare(self, kv_manager, chunks, device="cpu"):
        """The engine's rows of the target request in this step's flattened batch."""
        row, self.rows = 0, None
        for c in chunks:
            if c.request.request_id == self.target:
                self.rows = slice(row, row + c.num_tokens)
            row += c.num_tokens
        return self._orig(kv_manager, chunks, device)

    def _pre(self, module, args, kwargs):
        self.positions = args[1][0].tolist()

    def _layer(self, key, out):
        x = out[0] if isinstance(out, tuple) else out
        if self.rows is None or x.dim() != 3:
            return
        pos = self.positions[self.rows]
        for p, row in zip(pos, x[0, self.rows]):
            self.by_pos.setdefault(p, {})[key] = row.clone()


def engine(model, tok, **kw):
    gc.collect()                                      # the previous engine's KV pool
    return LLMEngine.from_model(model, tok, policy="continuous", max_num_seqs=32, max_num_batched_tokens=512,
                                block_size=16, num_blocks=640, enable_prefix_caching=False, enforce_eager=True,
                                **kw)


def params(r):
    return SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)


def first_difference(a: dict, b: dict):
    for p in sorted(set(a) & set(b)):
        for i in a[p]:                              # hooks fire in execution order: dicts keep it
            if not torch.equal(a[p][i], b[p][i]):
                return p, i, float((a[p][i].float() - b[p][i].float()).abs().max())
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch-invariant", action="store_true")
    ap.add_argument("--request", type=int, default=None, help="skip the counts: compare this request's ops")
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM("smollm2-135m-instruct", dtype=args.dtype, kv_cache_memory_bytes=2**27)
    model, tok = llm.model, llm.tokenizer
    trace = text_trace(tok, args.requests, rate=math.inf, prompt_len=(16, 192), output_len=(16, 48), seed=0)
    kw = {"batch_invariant": args.batch_invariant}
    rec = Recorder(model, None)
    if args.request is not None:
        return compare(model, tok, trace, args.request, rec, kw)
    together = [r.output_token_ids for r in run_trace(engine(model, tok, **kw), trace, params)[0]]
    seq = [list(generate_tokens(model, r.prompt_token_ids, params(r))) for r in trace]
    print(f"engine batched == one by one (generate_tokens): {sum(a == b for a, b in zip(together, seq))}"
          f"/{len(trace)}")
    eng = engine(model, tok, **kw)
    alone = [run_trace(eng, [r], params)[0][0].output_token_ids for r in trace]
    print(f"engine batched == engine alone: {sum(a == b for a, b in zip(together, alone))}/{len(trace)}; "
          f"engine alone == generate_tokens: {sum(a == b for a, b in zip(alone, seq))}/{len(trace)}")
    bad = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    if bad:
        compare(model, tok, trace, bad[0], rec, kw)


def compare(model, tok, trace, i, rec, kw):
    """Every op's output rows of request ``i``: batched vs alone vs generate_tokens."""
    r = trace[i]
    rec.target = r.request_id
    runs = {}
    for name, fn in [("batched", lambda: run_trace(engine(model, tok, **kw), trace, params)),
                     ("alone", lambda: run_trace(engine(model, tok, **kw), [r], params))]:
        rec.by_pos = {}
        fn()
        runs[name] = rec.by_pos
    rec.by_pos, rec.rows = {}, slice(None)
    list(generate_tokens(model, r.prompt_token_ids, params(r)))
    runs["generate_tokens"] = rec.by_pos
    print(f"request {i}: prompt {len(r.prompt_token_ids)} tokens; first (position, layer, max |diff|):")
    for a, b in [("batched", "alone"), ("alone", "generate_tokens"), ("batched", "generate_tokens")]:
        print(f"  {a} vs {b}: {first_difference(runs[a], runs[b])}")


if __name__ == "__main__":
    main()
