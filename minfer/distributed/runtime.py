"""One driver, many followers: how ``LLM(tensor_parallel_size=N)`` and torchrun runs work.
The driver (rank 0) schedules, samples and stops; followers, spawned here or started by torchrun, run
each step it broadcasts (vLLM: ``vllm/v1/executor/multiproc_executor.py``; docs/parallelism.md).
"""
import atexit
import contextlib
import os
import sys
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist

from minfer.distributed import comm
from minfer.distributed.engine import follow_engine
from minfer.validation import check_int


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            check_int(getattr(self, name), name, lo=1)
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size cannot both be > 1 yet "
                             "(one kind of parallelism at a time)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def load_parallel_model(model: str, pc: ParallelConfig, rank: int, dtype, device):
    """-> (full config, this rank's model: a TP shard or a pipeline stage, tokenizer)."""
    if pc.tensor_parallel_size > 1:
        from minfer.distributed.tensor_parallel import load_tp_checkpoint
        return load_tp_checkpoint(model, rank, pc.tensor_parallel_size, dtype=dtype, device=device)
    from minfer.distributed.pipeline import PipelineStage
    from minfer.loading import load_model
    cfg, full, tok = load_model(model, device=device, dtype=dtype)
    return cfg, PipelineStage(full, rank, pc.pipeline_parallel_size), tok


def check_sizes(model: str, pc: ParallelConfig) -> None:
    """Refuse degrees the model cannot be split into, before any process starts (ValueError naming the field)."""
    from minfer.checkpoints.hf import read_config
    from minfer.checkpoints.loader import resolve_model
    from minfer.distributed.pipeline import stage_layers
    from minfer.distributed.tensor_parallel import check_tp_size, tp_sizes
    path, tp = resolve_model(model), pc.tensor_parallel_size
    if path.suffix == ".gguf":
        if tp > 1:
            raise ValueError(f"{path}: tensor parallelism loads HF safetensors folders only (slices need get_slice)")
        return
    cfg = read_config(path)
    stage_layers(cfg.num_hidden_layers, 0, pc.pipeline_parallel_size, cfg.kv_share_group)
    try:
        check_tp_size(cfg, tp)
    except ValueError:
        nkv, ok = cfg.num_key_value_heads, tp_sizes(cfg)
        rule = f"must divide {nkv}" if all(nkv % d == 0 for d in ok) else f"must be one of {ok}"
        raise ValueError(f"{path.name} has {nkv} KV heads: tensor_parallel_size {rule}, got {tp}") from None


# --- The driver side ---
DRIVERS: list["Driver"] = []      # this process's drivers (torchrun_main shuts them down)


class Driver:
    """Rank 0's handle on the group: the followers it spawned, and the shutdown that ends them."""

    def __init__(self, pc: ParallelConfig, procs=()):
        self.pc, self.procs, self.closed = pc, list(procs), False
        DRIVERS.append(self)
        atexit.register(self.shutdown)

    def shutdown(self) -> None:
        """Tell the followers to return; wait for spawned ones; leave the group."""
        if self.closed or not dist.is_initialized():
            return
        self.closed = True
        with contextlib.suppress(comm.DistributedError):
            comm.broadcast_object(None)
        for p in self.procs:
            p.join(timeout=10)
        comm.leave_group()


def _spawned_follower(rank, world, port, model, pc, dtype, device, timeout_s):
    comm.set_local_env(rank, world, port)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    comm.init_distributed(None, timeout_s)
    _, shard, _ = load_parallel_model(model, pc, rank, dtype, device)
    try:
        follow_engine(shard)
    except comm.DistributedError:
        comm.exit_now(3)              # the driver is gone: nobody to report to
    comm.leave_group()


def start_driver(model: str, pc: ParallelConfig, dtype, device, timeout_s: float = comm.DEFAULT_TIMEOUT_S):
    """Make this process rank 0 of ``pc.world_size`` ranks -> (config, shard, tokenizer, Driver). Under
    torchrun the group exists already; otherwise the followers are spawned here (as vLLM's executor)."""
    procs = []
    if dist.is_initialized() or comm.launched_by_torchrun():
        rank, world = comm.init_distributed(None, timeout_s)
        if world != pc.world_size:
            raise ValueError(f"torchrun started {world} processes but tensor_parallel_size x "
                             f"pipeline_parallel_size = {pc.world_size}")
        if rank != 0:
            raise ValueError("only rank 0 builds the LLM; other ranks call minfer.distributed.follow_engine")
    else:
        import torch.multiprocessing as mp
        check_sizes(model, pc)
        port = comm.free_port()
        ctx = mp.get_context("spawn")
        for r in range(1, pc.world_size):
            p = ctx.Process(target=_spawned_follower, daemon=True,
                            args=(r, pc.world_size, port, model, pc, dtype, str(device), timeout_s))
            p.start()
            procs.append(p)
        with mock.patch.dict(os.environ):    # restored after: no torchrun look-alike is left in this process
            comm.set_local_env(0, pc.world_size, port)
            comm.init_distributed(None, timeout_s)
    cfg, shard, tok = load_parallel_model(model, pc, 0, dtype, device)
    return cfg, shard, tok, Driver(pc, procs)


# --- The follower side ---
def torchrun_main(args) -> int:
    """``torchrun --nproc-per-node N -m minfer.cli generate ...``: rank 0 runs the command
    with ``tensor_parallel_size=N`` (or ``--pipeline-parallel``: N stages), the others follow."""
    rank, world = comm.init_distributed(None, getattr(args, "dist_timeout", comm.DEFAULT_TIMEOUT_S))
    pp = getattr(args, "pipeline_parallel", False)
    args.tensor_parallel_size, args.pipeline_parallel_size = (1, world) if pp else (world, 1)
    try:
        if rank == 0:
            try:
                return args.func(args) or 0
            except (ValueError, FileNotFoundError) as e:
                hint = (" (choose --nproc-per-node among those sizes, or add --pipeline-parallel)"
                        if "tensor_parallel_size" in str(e) and not pp else "")
                print(f"minfer: error: {e}{hint}", file=sys.stderr)
                return 2
            finally:
                for d in DRIVERS:
                    d.shutdown()
        from minfer.devices import resolve_device, resolve_dtype
        pc = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size)
        device = resolve_device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        _, shard, _ = load_parallel_model(args.model, pc, rank, resolve_dtype(args.dtype), device)
        follow_engine(shard)
        return 0
    except comm.DistributedError as e:
        print(f"minfer: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError):        # bad input: rank 0 has printed the same error
        return 2
    finally:
        comm.leave_group()
