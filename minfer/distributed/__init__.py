"""Past one device: tensor and pipeline parallelism on ``torch.distributed``, and
prefill/decode disaggregation.

    comm.py             the process group (torchrun / ``launch``), timed collectives, COMM_STATS
    layers.py           ColumnParallelLinear, RowParallelLinear, QKVParallelLinear,
                        VocabParallelEmbedding, ParallelLMHead (vLLM's names), shard_weight
    tensor_parallel.py  shard_model: a built Transformer -> this rank's shard (safetensors get_slice)
    pipeline.py         PipelineStage: a rank's layers, hidden states by send/recv, micro-batches
    disagg.py           a prefill worker and a decode worker, K/V blocks sent point to point
    runtime.py          the driver and its followers: LLM(tensor_parallel_size=N), torchrun
    engine.py           LLMEngine under TP or PP: the driver broadcasts each scheduled step, followers run it
    checks.py, measure.py   multi-process checks (tests, lesson) and measurements (bench parallel)

Lesson 11 (``lessons/11_parallelism.ipynb``) walks through all of it.
"""
from minfer.distributed.comm import COMM_STATS, DistributedError, init_distributed, launch
from minfer.distributed.disagg import admit_prefilled, decode_worker, prefill_worker
from minfer.distributed.engine import DriverRunner, follow_engine, parallel_engine
from minfer.distributed.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_weight,
)
from minfer.distributed.pipeline import PipelineStage, bubble_fraction, stage_layers
from minfer.distributed.runtime import ParallelConfig
from minfer.distributed.tensor_parallel import (
    SafetensorsSource,
    StateDictSource,
    allreduce_bytes_per_token,
    build_tp_model,
    check_tp_size,
    load_tp_checkpoint,
    shard_model,
)

__all__ = ["DriverRunner", "follow_engine", "parallel_engine", "COMM_STATS", "DistributedError",
           "init_distributed", "launch", "admit_prefilled", "decode_worker",
           "prefill_worker", "ColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "shard_weight", "PipelineStage", "bubble_fraction", "stage_layers",
           "ParallelConfig", "SafetensorsSource", "StateDictSource", "allreduce_bytes_per_token",
           "build_tp_model", "check_tp_size", "load_tp_checkpoint", "shard_model"]
