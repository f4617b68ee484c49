"""Megatron-style tensor-parallel layers (Shoeybi et al. 2019), with vLLM's names: column parallel splits
W's output rows, row parallel its input columns (then one all-reduce). vLLM:
``vllm/model_executor/layers/linear.py``, ``vocab_parallel_embedding.py`` (docs/parallelism.md).
"""
import torch
import torch.nn.functional as F
from torch import nn

from minfer.distributed import comm


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's equal share of ``size`` items; ``size`` must divide by ``world``."""
    if size % world:
        raise ValueError(f"{size} does not divide into {world} equal shards")
    per = size // world
    return rank * per, (rank + 1) * per


def shard_weight(weight: torch.Tensor, rank: int, world: int, kind: str) -> torch.Tensor:
    """Rank ``rank``'s piece of an ``nn.Linear`` weight (out, in): ``"column"`` parallel keeps
    rows (output features) [r*out/N, (r+1)*out/N); ``"row"`` parallel keeps columns (inputs)."""
    if kind == "column":
        a, b = shard_range(weight.shape[0], rank, world)
        return weight[a:b]                                              # (out / N, in)
    if kind == "row":
        a, b = shard_range(weight.shape[1], rank, world)
        return weight[:, a:b]                                           # (out, in / N)
    raise ValueError(f"kind must be 'column' or 'row', got {kind!r}")


class ColumnParallelLinear(nn.Module):
    """Holds rows [start, stop) of W (out, in): this rank's output features, no communication; with
    ``gather_output=True`` (the LM head) the full output is all-gathered."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 gather_output: bool = False, group=None, full_out: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)          # (out / tp, in)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gather_output, self.group = gather_output, group
        self.full_out = full_out                                         # drop padding after the gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)                          # (..., out / tp)
        if self.gather_output:
            y = comm.all_gather_last(y, self.group)                      # (..., out [+ padding])
            if self.full_out is not None:
                y = y[..., :self.full_out]
        return y


class QKVParallelLinear(ColumnParallelLinear):
    """vLLM's fused ``qkv_proj``, split at head boundaries: a rank's q heads' rows, then its k, then its v.
    K/V heads are replicated when tp exceeds them, so a GQA group stays with its K/V head."""

    @staticmethod
    def head_range(num_heads: int, num_kv_heads: int, rank: int, world: int, kind: str) -> tuple[int, int]:
        """[first, last) head of ``kind`` ("q" or "kv") that ``rank`` holds."""
        if kind == "q":
            return shard_range(num_heads, rank, world)
        if num_kv_heads >= world:
            return shard_range(num_kv_heads, rank, world)
        first = rank * num_kv_heads // world                            # replicated K/V head
        return first, first + 1


class RowParallelLinear(nn.Module):
    """Holds columns of W (out, in): this rank's input slice in, the full output after one all-reduce out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)          # (out, in / tp)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = comm.all_reduce(F.linear(x, self.weight), self.group)       # (..., out): partial sums added
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table (vocab padded to a multiple of tp). Ids outside
    them look up zeros, so the all-reduce adds exactly one non-zero row per token (the owner's)."""

    def __init__(self, weight: torch.Tensor, start: int, *, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)          # (vocab_padded / tp, h)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start                                         # (B, T)
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)   # (B, T, h)
        x = x * mine[..., None].to(x.dtype)
        return comm.all_reduce(x, self.group)


class ParallelLMHead(ColumnParallelLinear):
    """The LM head over the vocabulary shard, all-gathered, padding removed (tied: the embedding's weight)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, *, group=None):
        super().__init__(weight, None, gather_output=True, group=group, full_out=vocab_size)
