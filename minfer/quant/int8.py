"""int8 weight-only quantization ("W8A16"): symmetric, one scale per output channel.

    q int8 (N, K) in [-127, 127];   scale float32 (N,) = max_k |W[n, k]| / 127;   |W - q * scale| <= scale / 2

gpt-fast ``quantize.py`` (``WeightOnlyInt8Linear``), torchao ``int8_weight_only``; the CPU matmul is
``torch.ops.aten._weight_int8pack_mm`` (docs/quantization.md).
"""
import torch

QMAX = 127                      # the grid is -127 .. 127 (symmetric; -128 unused)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) float -> (q int8 (N, K), scale float32 (N,)); a row of zeros gets scale 1.0 (stored
    exactly, no division by zero)."""
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
