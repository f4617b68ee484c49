"""Optional hand-written kernels, each tested against a plain-PyTorch reference.

    paged_decode       PagedAttention for decode steps, one Triton program per (sequence, K/V head)
    cpu_paged_decode   the same loop in C++ for the CPU, one work item per sequence, compiled on
                       first use (the engine's default decode attention on a CPU in float32)
    onednn_linear      linears on oneDNN-prepacked weights (CPU, float32 or bfloat16)
    cpu_quant_linear   W8A8 / W4A8 linears: int8 activations, integer dot products (C++)

Both paged decode kernels take the same shapes (checked by ``check_paged_decode_args``) and
are tested equal to ``minfer.attention.paged.paged_attention_reference``::

    q                  (S, n_heads, head_dim)
    k_cache, v_cache   (num_blocks, block_size, n_kv_heads, head_dim)   one layer of the pool
    block_tables       (S, max_blocks)
    context_lens       (S,)

Triton is an optional extra (``pip install -e ".[triton]"``); the modules import
without it and say so when called. On a machine without a CUDA GPU the Triton
kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
Triton is imported. Nothing is imported here until it is asked for, so that
``import minfer.kernels.onednn_linear`` does not import Triton.
"""
import importlib

__all__ = ["paged_decode_attention", "check_paged_decode_args"]


def check_paged_decode_args(q, k_cache, v_cache, block_tables, context_lens) -> None:
    """ValueError naming the problem when the shapes above do not fit together."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention: expected q (S, nh, hd) and k/v caches (num_blocks, "
                         f"block_size, nkv, hd), got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    S, nh, hd = q.shape
    nkv = k_cache.shape[2]
    if k_cache.shape[3] != hd or nh % nkv:
        raise ValueError(f"paged_decode_attention: {nh} query heads of {hd} do not group over "
                         f"{nkv} K/V heads of {k_cache.shape[3]}")
    if block_tables.shape[0] != S or context_lens.shape != (S,):
        raise ValueError(f"paged_decode_attention: block_tables {tuple(block_tables.shape)} and context_lens "
                         f"{tuple(context_lens.shape)} must have one row per sequence ({S})")


def __getattr__(name: str):
    if name == "paged_decode_attention":
        return importlib.import_module("minfer.kernels.paged_decode").paged_decode_attention
    raise AttributeError(f"module 'minfer.kernels' has no attribute {name!r}")
