"""The serving engine under tensor or pipeline parallelism: the driver schedules, every rank runs the step.

    rank 0: LLMEngine (scheduler, block manager, sampling, detokenizing, streaming)
              runner = DriverRunner: build the step's metadata ──broadcast──> followers
              forward on its shard + paged cache                           forward on theirs
              (all-reduces inside the model keep the ranks in step)
    ranks 1..N-1: follow_engine(): receive a step, run it, until the driver sends None

What travels per step is the flattened batch: token ids, the ``PagedBatch`` (positions, slot
mapping, block tables), pending copy-on-write copies and which rows need logits. Followers
keep no scheduler and no block manager: block tables come from the driver, and each rank's
KV pool holds only its own K/V heads (TP). Under pipeline parallelism each stage runs its layers
on the step, optionally in micro-batches of whole sequences so that stages overlap. vLLM: ``vllm/v1/executor/multiproc_executor.py``
(``collective_rpc("execute_model", scheduler_output)``) and the worker's model runner.
The scheduler and the engine loop are the single-process ones, unchanged.
"""
from __future__ import annotations

import torch

from minfer.distributed import comm


def run_step(model, cache, step: dict, attention: str) -> torch.Tensor:
    """One forward over a flattened batch on this rank's shard or stage -> logits (len(rows), vocab).

    The same body as ``ModelRunner.execute`` after its metadata is built; kept separate because
    here the metadata arrives over the wire instead of from a block manager. Several metas =
    pipeline micro-batches (``PipelineStage.forward_paged_microbatches``).
    """
    metas, rows = step["metas"], step["rows"]
    cache.copy_blocks(step["copies"])
    input_ids = torch.tensor([step["ids"]], device=metas[0].positions.device)    # (1, N)
    if len(metas) > 1:
        return model.forward_paged_microbatches(input_ids, metas, rows, cache, attention)[0]
    meta = metas[0]
    cache.set_batch(meta)
    idx = meta.logits_indices[rows[0]] if rows[0] else meta.logits_indices[:0]
    return model(input_ids, meta.positions, kv_cache=cache, attention=attention, logits_indices=idx)[0]


class DriverRunner:
    """Stands in for ``ModelRunner`` on rank 0: same ``execute``, plus a broadcast of the step.

    ``num_microbatches > 1`` (pipeline parallel only) cuts each step's sequences into that many
    groups, so that the stages work on different groups at the same time.
    """

    def __init__(self, runner, num_microbatches: int = 1):
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self.runner, self.num_microbatches = runner, num_microbatches
        self.kv_manager, self.vocab_size, self.cache = runner.kv_manager, runner.vocab_size, runner.cache
        comm.broadcast_object({"num_blocks": runner.cache.num_blocks, "block_size": runner.cache.block_size,
                               "attention": runner.attention, "cache_type": type(runner.cache)})

    @torch.no_grad()
    def execute(self, chunks, sample_rows) -> torch.Tensor:
        from minfer.kv.paged import PagedBatch
        r = self.runner
        groups = [g for g in torch.arange(len(chunks)).tensor_split(self.num_microbatches) if len(g)]
        metas, rows = [], []
        for g in groups:
            first, last = int(g[0]), int(g[-1]) + 1
            metas.append(PagedBatch.build(self.kv_manager, [(c.request.request_id, c.start, c.num_tokens)
                                                            for c in chunks[first:last]], device=r.device))
            rows.append([i - first for i in sample_rows if first <= i < last])
        step = {"metas": metas, "rows": rows, "copies": self.kv_manager.take_pending_copies(),
                "ids": [t for c in chunks for t in c.request.all_token_ids[c.start:c.start + c.num_tokens]]}
        try:
            comm.broadcast_object(step)
            return run_step(r.model, self.cache, step, r.attention)
        except comm.DistributedError:
            self.fail_requests()
            raise

    def fail_requests(self) -> None:
        """A rank is gone: abort every unfinished request of the engine (its finish reason becomes
        "abort"), so that callers waiting on them are released, then let the error propagate."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            for rid, req in list(engine.requests.items()):
                if not req.is_finished:
                    engine.abort(rid)

    def shutdown(self) -> None:
        comm.broadcast_object(None)


def parallel_engine(model, tokenizer=None, num_microbatches: int = 1, **engine_kwargs):
    """``LLMEngine.from_model`` on rank 0's TP shard or pipeline stage, its runner swapped for a
    ``DriverRunner``. The other ranks must be in ``follow_engine`` on their shards/stages."""
    from minfer.serving.engine import LLMEngine
    engine = LLMEngine.from_model(model, tokenizer, **engine_kwargs)
    engine.runner = DriverRunner(engine.runner, num_microbatches)
    engine.runner.engine = engine                  # to fail its requests if a rank dies
    return engine


@torch.no_grad()
def follow_engine(model) -> int:
    """A follower's loop: build the same kind of KV pool as the driver's (for this rank's heads),
    then run every broadcast step until the driver sends None. Returns the number of steps."""
    setup = comm.broadcast_object(None)
    w = model.model.embed_tokens.weight
    cache = setup["cache_type"](model.cfg, setup["num_blocks"], setup["block_size"], dtype=w.dtype, device=w.device)
    steps = 0
    while (step := comm.broadcast_object(None)) is not None:
        run_step(model, cache, step, setup["attention"])
        steps += 1
    return steps
