"""Shard a ``minfer.model.Transformer`` over a tensor-parallel group: ``shard_model`` swaps each projection
for its parallel layer holding this rank's slice (safetensors' ``get_slice``); the forward runs unchanged
on a rank-local config. vLLM: ``models/llama.py`` with each layer's ``weight_loader``.
"""
import dataclasses
import os
from pathlib import Path

import torch
from safetensors import safe_open

from minfer.config import ModelConfig
from minfer.validation import check_int
from minfer.distributed.layers import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                       RowParallelLinear, VocabParallelEmbedding, shard_range)


def tp_sizes(cfg: ModelConfig) -> list[int]:
    """The tensor-parallel sizes ``cfg`` splits into: whole query heads, whole (or replicated) K/V heads."""
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    return [d for d in range(1, nh + 1)
            if nh % d == 0 and (nkv % d == 0 or d % nkv == 0) and cfg.intermediate_size % d == 0]


def check_tp_size(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError (naming the field) unless ``cfg`` splits over ``tp`` ranks by whole heads."""
    check_int(tp, "tensor_parallel_size", lo=1)
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if nh % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide num_attention_heads={nh} (each rank "
                         f"needs whole query heads); sizes that work for this model: {tp_sizes(cfg)}")
    if nkv % tp and tp % nkv:
        raise ValueError(f"tensor_parallel_size={tp} and num_key_value_heads={nkv}: neither divides the "
                         "other, so whole K/V heads cannot be given (or replicated) to every rank")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide intermediate_size={cfg.intermediate_size}")


def allreduce_bytes_per_token(hidden_size: int, num_layers: int, tp: int, bytes_per_element: int = 2) -> float:
    """Bytes ONE rank sends per token for the blocks' all-reduces (o_proj and down_proj: 2 per layer of a
    ``hidden_size`` vector); a ring all-reduce sends 2 (N - 1) / N times the payload per rank."""
    payload = hidden_size * bytes_per_element
    return 2 * num_layers * 2 * (tp - 1) / tp * payload


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config one rank's attention sees: its own query and K/V head counts."""
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=max(1, cfg.num_key_value_heads // tp),
                               extra={**cfg.extra, "tensor_parallel_size": tp, "full_config": cfg})


# --- Where the slices come from ---
class StateDictSource:
    """Slices of tensors held in memory (a full model's ``state_dict()``)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def has(self, name: str) -> bool:
        return name in self.sd

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self.sd[name]
        return t.clone() if dim is None else t.narrow(dim, start, stop - start).clone()


class SafetensorsSource:
    """Slices read straight from an HF folder's ``*.safetensors`` files with ``get_slice``."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
        from minfer.checkpoints.hf import _safetensors_files
        self.dtype, self.device = dtype, device
        self.files = {}                                    # tensor name -> the open file that holds it
        for file in _safetensors_files(Path(folder)):
            f = safe_open(str(file), framework="pt", device="cpu")
            self.files.update(dict.fromkeys(f.keys(), f))

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        sl = self.files[name].get_slice(name)
        t = sl[:] if dim is None else sl[(slice(None),) * dim + (slice(start, stop),)]
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)


# --- The rewrite ---
def shard_model(model, source, rank: int, world: int, group=None):
    """Turn ``model`` (a ``Transformer``, maybe on the meta device) into rank ``rank``'s shard."""
    full = model.cfg
    check_tp_size(full, world)
    if full.kv_share_group != 1:
        raise ValueError("tensor parallelism with kv_share_group > 1 is not supported")
    cfg = local_config(full, world)
    hd = full.head_dim
    nh, nkv = full.num_attention_heads, full.num_key_value_heads
    q0, q1 = QKVParallelLinear.head_range(nh, nkv, rank, world, "q")
    k0, k1 = QKVParallelLinear.head_range(nh, nkv, rank, world, "kv")
    f0, f1 = shard_range(full.intermediate_size, rank, world)

    def column(module, prefix, ranges: dict[str, tuple[int, int]], cls):
        """Rows [a, b) of each HF projection of ``module``: one parallel linear each, or one if fused."""
        ws = [source.get(f"{prefix}{n}.weight", 0, a, b) for n, (a, b) in ranges.items()]
        bs = [source.get(f"{prefix}{n}.bias", 0, a, b) if source.has(f"{prefix}{n}.bias") else None
              for n, (a, b) in ranges.items()]
        module.parts = {n: b - a for n, (a, b) in ranges.items()}          # this rank's rows
        if module.fused_name:
            bias = None if bs[0] is None else torch.cat(bs)
            setattr(module, module.fused_name, cls(torch.cat(ws), bias, group=group))
        else:
            for n, w, bias in zip(ranges, ws, bs):
                setattr(module, n, cls(w, bias, group=group))

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        attn.cfg = cfg
        column(attn, p + "self_attn.", {"q_proj": (q0 * hd, q1 * hd), "k_proj": (k0 * hd, k1 * hd),
                                        "v_proj": (k0 * hd, k1 * hd)}, QKVParallelLinear)
        column(mlp, p + "mlp.", {"gate_proj": (f0, f1), "up_proj": (f0, f1)}, ColumnParallelLinear)
        attn.o_proj = RowParallelLinear(source.get(p + "self_attn.o_proj.weight", 1, q0 * hd, q1 * hd), group=group)
        mlp.down_proj = RowParallelLinear(source.get(p + "mlp.down_proj.weight", 1, f0, f1), group=group)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).weight = torch.nn.Parameter(source.get(p + norm + ".weight"), requires_grad=False)
    model.model.norm.weight = torch.nn.Parameter(source.get("model.norm.weight"), requires_grad=False)

    # Vocabulary: pad to a multiple of tp, so every rank holds the same number of rows.
    V = full.vocab_size
    per = -(-V // world)
    v0, v1 = min(rank * per, V), min((rank + 1) * per, V)

    def vocab_rows(name):
        w = source.get(name, 0, v0, v1)                                  # (<= per, h)
        return torch.nn.functional.pad(w, (0, 0, 0, per - w.shape[0]))   # (per, h): zero rows appended

    model.model.embed_tokens = VocabParallelEmbedding(vocab_rows("model.embed_tokens.weight"), v0, group=group)
    head_w = (model.model.embed_tokens.weight if full.tie_word_embeddings else vocab_rows("lm_head.weight"))
    model.lm_head = ParallelLMHead(head_w, V, group=group)
    device = model.model.embed_tokens.weight.device
    from minfer.model import rope_inv_freq
    model.inv_freq = rope_inv_freq(full).to(device)
    model.cfg = cfg
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"shard_model left parameters unloaded: {meta[:3]}")
    return model.eval().requires_grad_(False)


def build_tp_model(cfg: ModelConfig, source, rank: int, world: int, group=None, dtype=torch.float32, device="cpu"):
    """An empty ``Transformer`` on the meta device, sharded from ``source``: no full copy is ever built."""
    from minfer.model import Transformer
    check_tp_size(cfg, world)
    with torch.device("meta"):
        model = Transformer(cfg)
    return shard_model(model, source, rank, world, group).to(device=device, dtype=dtype)


def load_tp_checkpoint(name_or_path, rank: int, world: int, dtype=torch.float32, device="cpu", group=None):
    """-> (full config, this rank's sharded model, tokenizer) from an HF folder or registry name."""
    from minfer.checkpoints.hf import read_config
    from minfer.checkpoints.loader import resolve_model
    from minfer.tokenizer import Tokenizer
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        raise ValueError(f"{path}: tensor parallelism loads HF safetensors folders only (slices need get_slice)")
    cfg = read_config(path)
    model = build_tp_model(cfg, SafetensorsSource(path, dtype=dtype), rank, world, group, dtype, device)
    return cfg, model, Tokenizer.from_folder(path)
