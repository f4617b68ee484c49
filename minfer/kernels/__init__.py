"""Optional hand-written kernels, each tested against ``minfer/attention/reference.py``.

    paged_decode   PagedAttention for decode steps, one Triton program per (sequence, K/V head)

Triton is an optional extra (``pip install -e ".[triton]"``); the modules import
without it and say so when called. On a machine without a CUDA GPU the kernels
run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.
"""
from minfer.kernels.paged_decode import paged_decode_attention, paged_decode_reference

__all__ = ["paged_decode_attention", "paged_decode_reference"]
