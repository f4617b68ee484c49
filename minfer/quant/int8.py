"""int8 weight-only quantization: symmetric, one scale per output channel.

A weight matrix W (out_features N, in_features K) is stored as

    q      int8    (N, K)   values in [-127, 127]
    scale  float32 (N,)     scale[n] = max_k |W[n, k]| / 127

and read back as W[n, k] ~= q[n, k] * scale[n]. "Symmetric" means the grid
is centred on zero (no zero point): 0.0 is always stored exactly, and -128 is
left unused so that the grid is the same on both sides. "Per channel" means
each output row gets its own scale, so one row with a large weight does not
flatten the resolution of every other row (a per-tensor scale would).

Rounding to the nearest grid point makes the error of every element at most
half a step:  |W - q * scale| <= scale / 2  (plus float32 rounding).

Only the *weights* are quantized: activations stay in floating point, and a
matmul multiplies floats by int8 values scaled back up (weight-only, "W8A16").
Decode reads every weight once per token, so 4x fewer bytes than float32 is
up to 4x fewer bytes read per token.

Where the same idea lives: gpt-fast ``quantize.py`` (``WeightOnlyInt8Linear``),
torchao ``int8_weight_only``, vLLM ``layers/quantization/`` (its W8A16
kernels); the matmul on CPU is ``torch.ops.aten._weight_int8pack_mm``.
"""
from __future__ import annotations

import torch

QMAX = 127                      # the grid is -127 .. 127 (symmetric; -128 unused)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) float -> (q int8 (N, K), scale float32 (N,)).

    A row of zeros gets scale 1.0 (any positive scale stores zeros exactly),
    so no division by zero happens and dequantization stays a plain multiply.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight (out_features, in_features), "
                         f"got shape {tuple(w.shape)}")
    w = w.detach().float()
    amax = w.abs().amax(dim=1)                                    # (N,)
    scale = amax / QMAX                                           # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX)       # (N, K), round half to even
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 (N, K), scale (N,)) -> W float32 (N, K) = q * scale (row-wise)."""
    return q.float() * scale.float()[:, None]
