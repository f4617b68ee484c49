"""Past one device: tensor and pipeline parallelism on ``torch.distributed``, and prefill/decode
disaggregation. The files: docs/parallelism.md; lesson 11 walks through them.
"""
from minfer.distributed.comm import COMM_STATS, DistributedError, init_distributed, launch
from minfer.distributed.disagg import admit_prefilled, decode_worker, prefill_worker
from minfer.distributed.engine import DriverRunner, follow_engine, parallel_engine
from minfer.distributed.layers import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                       RowParallelLinear, VocabParallelEmbedding, shard_weight)
from minfer.distributed.pipeline import PipelineStage, bubble_fraction, stage_layers
from minfer.distributed.runtime import ParallelConfig
from minfer.distributed.tensor_parallel import (SafetensorsSource, StateDictSource, allreduce_bytes_per_token,
                                                build_tp_model, check_tp_size, load_tp_checkpoint,
                                                shard_model)

__all__ = ["DriverRunner", "follow_engine", "parallel_engine", "COMM_STATS", "DistributedError",
           "init_distributed", "launch", "admit_prefilled", "decode_worker",
           "prefill_worker", "ColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "shard_weight", "PipelineStage", "bubble_fraction", "stage_layers",
           "ParallelConfig", "SafetensorsSource", "StateDictSource", "allreduce_bytes_per_token",
           "build_tp_model", "check_tp_size", "load_tp_checkpoint", "shard_model"]
