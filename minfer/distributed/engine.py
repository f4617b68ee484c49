"""The serving engine under tensor or pipeline parallelism: the driver schedules, every rank runs the step.
The driver's runner broadcasts each flattened step; followers (``follow_engine``) run it. vLLM:
``multiproc_executor.py`` (``collective_rpc("execute_model", ...)``); docs/parallelism.md.
"""
import torch

from minfer.distributed import comm
from minfer.engine.runner import ModelRunner, prepare_batch, with_token_rows

POOL = ("num_blocks", "block_size", "attention_mode", "kv_cache_dtype", "decode_kernel")   # a follower's too


def run_step(runner: ModelRunner, step: dict) -> torch.Tensor:
    """One broadcast step on this rank's runner -> logits (len(rows), vocab); several metas: micro-batches."""
    metas, rows, ids = step["metas"], step["rows"], step["ids"]
    if len(metas) == 1:
        return runner.execute_model(ids, metas[0], rows[0], step["copies"])
    with torch.no_grad():
        runner.cache.copy_blocks(step["copies"])
        return runner.model.forward_paged_microbatches(ids, metas, rows, runner.cache, runner.attention)[0]


class DriverRunner:
    """Wraps rank 0's ``ModelRunner``: same ``execute``, plus a broadcast of the step. ``num_microbatches``
    > 1 (pipeline parallel) cuts each step's sequences into that many groups, each ``prepare_batch``ed."""

    def __init__(self, runner: ModelRunner, num_microbatches: int = 1):
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self.runner, self.num_microbatches = runner, num_microbatches
        self.kv_manager, self.vocab_size, self.cache = runner.kv_manager, runner.vocab_size, runner.cache
        self.on_failure = None            # called when a rank is gone (parallel_engine: abort everything)
        comm.broadcast_object({"attention": runner.attention, **{k: getattr(runner.cache, k) for k in POOL}})

    def execute(self, chunks, sample_rows, token_rows=()) -> torch.Tensor:
        r = self.runner
        splits = 1 if token_rows else self.num_microbatches          # token rows index the whole batch
        groups = [g for g in torch.arange(len(chunks)).tensor_split(splits) if len(g)]
        ids, metas, rows = [], [], []
        for g in groups:
            first, last = int(g[0]), int(g[-1]) + 1
            group_ids, meta = prepare_batch(self.kv_manager, chunks[first:last], r.device)
            ids.append(group_ids)
            metas.append(meta)
            rows.append([i - first for i in sample_rows if first <= i < last])
        if token_rows:
            metas[0], rows[0] = with_token_rows(metas[0], rows[0], token_rows)
        step = {"ids": torch.cat(ids, dim=1), "metas": metas, "rows": rows,        # ids (1, N)
                "copies": self.kv_manager.take_pending_copies()}
        try:
            comm.broadcast_object(step)
            return run_step(r, step)
        except comm.DistributedError:
            if self.on_failure is not None:
                self.on_failure()
            raise

    def shutdown(self) -> None:
        comm.broadcast_object(None)


def parallel_engine(model, tokenizer=None, num_microbatches: int = 1, **engine_kwargs):
    """``LLMEngine.from_model`` on rank 0's TP shard or pipeline stage, its runner a ``DriverRunner`` (the
    others ``follow_engine``); if a rank dies, every unfinished request is aborted, the error propagates."""
    from minfer.engine import LLMEngine
    engine = LLMEngine.from_model(model, tokenizer, **engine_kwargs,
                                  wrap_runner=lambda r: DriverRunner(r, num_microbatches))
    engine.runner.on_failure = lambda: [engine.abort(rid) for rid in list(engine.samples)]
    return engine


def follower_runner(model) -> ModelRunner | None:
    """The driver's kind of runner, from its broadcast setup (None: it shut down before building one)."""
    setup = comm.broadcast_object(None)
    return None if setup is None else ModelRunner(model, **setup)


def follow_engine(model) -> int:
    """A follower's loop: run every broadcast step until the driver sends None. Returns the number of steps."""
    runner = follower_runner(model)
    steps = 0
    while runner is not None and (step := comm.broadcast_object(None)) is not None:
        run_step(runner, step)
        steps += 1
    return steps
