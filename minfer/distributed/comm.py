"""The process group, timed collectives, and a launcher: everything that touches ``torch.distributed``.
A dead rank is one ``DistributedError`` (timeouts), not a hang; ``COMM_STATS`` counts bytes and seconds.
vLLM: ``vllm/distributed/parallel_state.py``, ``communication_op.py`` (docs/parallelism.md).
"""
import os
import socket
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective or a point-to-point transfer failed: a rank died, or did not answer in time."""


_PEER_LOST = False   # set once a collective has failed: the group is broken


def peer_lost() -> bool:
    """True once a collective in this process has failed (a rank died or timed out)."""
    return _PEER_LOST


def leave_group() -> None:
    """Destroy the process group, unless a rank was lost: tearing down a gloo group whose peer is
    gone can abort the process (SIGABRT from gloo's C++ threads); ``exit_now`` reclaims it instead."""
    if dist.is_initialized() and not _PEER_LOST:
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """Flush and end the process at once, skipping a broken group's destructors (see ``leave_group``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fail(what: str, e: Exception) -> DistributedError:
    global _PEER_LOST
    _PEER_LOST = True
    rank = dist.get_rank() if dist.is_initialized() else "?"
    return DistributedError(f"rank {rank}: {what} failed (another rank died or did not answer within "
                            f"the timeout): {str(e).splitlines()[0] if str(e) else type(e).__name__}")


# --- Counting what goes over the wire ---
@dataclass
class CommStats:
    """Calls, bytes and seconds per collective since the last ``reset`` (this rank's view)."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    def add(self, op: str, nbytes: int, seconds: float) -> None:
        self.calls[op] += 1
        self.bytes[op] += nbytes
        self.seconds[op] += seconds

    def reset(self) -> None:
        for counter in (self.calls, self.bytes, self.seconds):
            counter.clear()


COMM_STATS = CommStats()


# --- Starting the group ---
def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it exports RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join torchrun's group (its environment) -> (rank, world); backend None: NCCL with CUDA, else gloo."""
    if not dist.is_initialized():
        if not launched_by_torchrun():
            missing = [v for v in TORCHRUN_VARS if v not in os.environ]
            raise ValueError(f"not started by torchrun: environment variable(s) {missing} are not set "
                             "(run `torchrun --nproc-per-node N -m minfer.cli ...`)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        global _PEER_LOST
        _PEER_LOST = False                  # a new group: nobody lost yet
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_local_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun would export, for a group of processes on this machine."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _launched(rank: int, world: int, port: int, timeout_s: float, fn, args) -> None:
    set_local_env(rank, world, port)
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s)
    try:
        fn(rank, world, *args)
    except BaseException:
        if not _PEER_LOST:
            leave_group()
            raise
        traceback.print_exc()
        exit_now(1)
    if _PEER_LOST:          # fn handled the loss (and saved what it had): exit without teardown
        exit_now(0)
    leave_group()


def launch(fn, nprocs: int, *args, timeout_s: float = 30.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes joined by a gloo group: torchrun
    from Python (tests, notebooks). ``fn`` must be a module-level function; a rank that raises raises here."""
    import torch.multiprocessing as mp
    mp.start_processes(_launched, args=(nprocs, free_port(), timeout_s, fn, args), nprocs=nprocs,
                       join=True, start_method="spawn")


# --- Collectives, each timed, counted, and turned into DistributedError on failure ---
def _timed(op: str, nbytes: int, call):
    t0 = time.perf_counter()
    try:
        result = call()
    except (RuntimeError, ValueError) as e:   # gloo: "Connection closed by peer", timeouts
        raise _fail(op, e) from None
    COMM_STATS.add(op, nbytes, time.perf_counter() - t0)
    return result


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group``, in place; returns it. Bytes counted: x.nbytes."""
    _timed("all_reduce", x.nbytes, lambda: dist.all_reduce(x, group=group))
    return x


def all_gather_last(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim (rank order)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    _timed("all_gather", x.nbytes * len(parts), lambda: dist.all_gather(parts, x.contiguous(), group=group))
    return torch.cat(parts, dim=-1)


def broadcast_object(obj, src: int = 0, group=None):
    """The driver's ``obj`` on every rank (pickled). Used for request and step metadata."""
    box = [obj]
    _timed("broadcast", 0, lambda: dist.broadcast_object_list(box, src=src, group=group))
    return box[0]


def send(x: torch.Tensor, dst: int) -> None:
    _timed("send", x.nbytes, lambda: dist.send(x.contiguous(), dst))


def recv(x: torch.Tensor, src: int) -> torch.Tensor:
    _timed("recv", x.nbytes, lambda: dist.recv(x, src))
    return x


def send_object(obj, dst: int) -> None:
    _timed("send", 0, lambda: dist.send_object_list([obj], dst))


def recv_object(src: int):
    box = [None]
    _timed("recv", 0, lambda: dist.recv_object_list(box, src))
    return box[0]


def barrier(group=None) -> None:
    _timed("barrier", 0, lambda: dist.barrier(group=group))
