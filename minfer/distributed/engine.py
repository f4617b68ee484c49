"""The serving engine under tensor parallelism: the driver schedules, every rank runs the step.

    rank 0: LLMEngine (scheduler, block manager, sampling, detokenizing, streaming)
              runner = DriverRunner: build the step's metadata ──broadcast──> followers
              forward on its shard + paged cache                           forward on theirs
              (all-reduces inside the model keep the ranks in step)
    ranks 1..N-1: follow_engine(): receive a step, run it, until the driver sends None

What travels per step is the flattened batch: token ids, the ``PagedBatch`` (positions, slot
mapping, block tables), pending copy-on-write copies and which rows need logits. Followers
keep no scheduler and no block manager: block tables come from the driver, and each rank's
KV pool holds only its own K/V heads. vLLM: ``vllm/v1/executor/multiproc_executor.py``
(``collective_rpc("execute_model", scheduler_output)``) and the worker's model runner.
The scheduler and the engine loop are the single-process ones, unchanged.
"""
from __future__ import annotations

import torch

from minfer.distributed import comm


def run_step(model, cache, step: dict, attention: str) -> torch.Tensor:
    """One forward over a flattened batch on this rank's shard -> logits (len(rows), vocab).

    The same body as ``ModelRunner.execute`` after its metadata is built; kept separate because
    here the metadata arrives over the wire instead of from a block manager.
    """
    meta = step["meta"]
    cache.copy_blocks(step["copies"])
    cache.set_batch(meta)
    rows = meta.logits_indices[step["rows"]] if step["rows"] else meta.logits_indices[:0]
    input_ids = torch.tensor([step["ids"]], device=meta.positions.device)        # (1, N)
    return model(input_ids, meta.positions, kv_cache=cache, attention=attention, logits_indices=rows)[0]


class DriverRunner:
    """Stands in for ``ModelRunner`` on rank 0: same ``execute``, plus a broadcast of the step."""

    def __init__(self, runner):
        self.runner = runner
        self.kv_manager, self.vocab_size, self.cache = runner.kv_manager, runner.vocab_size, runner.cache
        comm.broadcast_object({"num_blocks": runner.cache.num_blocks, "block_size": runner.cache.block_size,
                               "attention": runner.attention, "cache_type": type(runner.cache)})

    @torch.no_grad()
    def execute(self, chunks, sample_rows) -> torch.Tensor:
        from minfer.kv.paged import PagedBatch
        r = self.runner
        meta = PagedBatch.build(self.kv_manager, [(c.request.request_id, c.start, c.num_tokens) for c in chunks],
                                device=r.device)
        step = {"meta": meta, "copies": self.kv_manager.take_pending_copies(), "rows": list(sample_rows),
                "ids": [t for c in chunks for t in c.request.all_token_ids[c.start:c.start + c.num_tokens]]}
        comm.broadcast_object(step)
        return run_step(r.model, self.cache, step, r.attention)

    def shutdown(self) -> None:
        comm.broadcast_object(None)


def tp_engine(model, tokenizer=None, **engine_kwargs):
    """``LLMEngine.from_model`` on rank 0's shard, its runner swapped for a ``DriverRunner``.
    The other ranks must be in ``follow_engine`` on their shards."""
    from minfer.serving.engine import LLMEngine
    engine = LLMEngine.from_model(model, tokenizer, **engine_kwargs)
    engine.runner = DriverRunner(engine.runner)
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
