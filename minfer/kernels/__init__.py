"""Optional hand-written kernels, each tested against a plain-PyTorch reference.

    paged_reference    the shapes and the plain-PyTorch reference of paged decode attention
    paged_decode       PagedAttention for decode steps, one Triton program per (sequence, K/V head)
    cpu_paged_decode   the same loop in C++ for the CPU, one work item per sequence, compiled on
                       first use (the engine's default decode attention on a CPU in float32)
    onednn_linear      linears on oneDNN-prepacked weights (CPU, float32)

Triton is an optional extra (``pip install -e ".[triton]"``); the modules import
without it and say so when called. On a machine without a CUDA GPU the Triton
kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before
Triton is imported. Nothing is imported here until it is asked for, so that
``import minfer.kernels.onednn_linear`` does not import Triton.
"""
from __future__ import annotations

import importlib

__all__ = ["paged_decode_attention", "paged_decode_reference"]


def __getattr__(name: str):
    if name == "paged_decode_attention":
        return importlib.import_module("minfer.kernels.paged_decode").paged_decode_attention
    if name == "paged_decode_reference":
        return importlib.import_module("minfer.kernels.paged_reference").paged_decode_reference
    raise AttributeError(f"module 'minfer.kernels' has no attribute {name!r}")
