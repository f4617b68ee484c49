"""Linears with int8 activations (W8A8, W4A8) on the CPU: ``cpu_quant_linear.cpp`` and its reference.

Each activation row is rounded to int8 in blocks of 32 (one scale per block, llama.cpp's Q8_0 /
Q8_1), and the kernel takes integer dot products with the stored 4- or 8-bit weights (AVX-512
VNNI ``vpdpbusd``, or AVX2's ``vpmaddubsw`` + ``vpmaddwd``), applying the scales after. The
plain-torch reference is the same function: round the activations the same way, then an
ordinary float linear on the dequantized weight; they differ only in the order of float
additions (``tests/test_quant_a8.py``). The .cpp explains the arithmetic; docs/kernels.md gives
the figures and the error it adds.

The kernel is built by ``cpu_paged_decode.build_extension`` (same flags, same cache). Where it
cannot run (no AVX2, no compiler, a tensor not on the CPU), ``why_unavailable()`` says why and
``QuantizedLinear`` runs the reference instead: same numbers, more slowly.
"""
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

QK = 32
_SOURCE = Path(__file__).with_name("cpu_quant_linear.cpp")
_state: dict = {}


def why_unavailable() -> Optional[str]:
    """None when the kernel runs on this CPU; otherwise the reason (building it on first call)."""
    return load_a8_kernel(_state, _SOURCE, "CPU int8-activation linear kernel")


def isa() -> str:
    """The integer dot product the kernel uses here: "avx512-vnni", "avx2", or "" when it does not run."""
    return "" if why_unavailable() else _state["module"].a8_isa()


def load_a8_kernel(state: dict, source: Path, what: str) -> Optional[str]:
    """Build ``source`` into ``state["module"]`` once; None when it runs on this CPU, else why not."""
    if "why" not in state:
        from minfer.kernels.cpu_paged_decode import build_extension
        try:
            state["module"] = build_extension(source, what)
            state["why"] = None if state["module"].a8_isa() else "this CPU lacks AVX2 (and AVX-512 VNNI)"
        except Exception as e:         # no compiler, no ninja, a failed build
            line = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            state["why"] = f"the kernel could not be built ({type(e).__name__}: {line}; it needs g++ and ninja)"
    return state["why"]


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), K % 32 == 0 -> xq int8 (M, K), dx (M, K/32), sx = dx * sum(xq) per block (M, K/32).
    x ~ dx * xq blockwise; ties round to even, as the kernel's ``vcvtps2dq``."""
    m, k = x.shape
    xb = x.float().reshape(m, k // QK, QK)
    d = xb.abs().amax(-1) * (1 / 127)                 # (M, G); times the float32 of 1/127, as the kernel
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = (xb * inv[..., None]).round()                                       # (M, G, 32)
    return q.to(torch.int8).reshape(m, k), d, d * q.sum(-1)


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> the float values its int8 blocks stand for (K padded to 32 inside, then cut)."""
    k = x.shape[-1]
    x2 = F.pad(x.reshape(-1, k).float(), (0, -k % QK))
    xq, d, _ = quantize_rows_reference(x2)
    return (xq.float().reshape(len(x2), -1, QK) * d[..., None]).reshape(x2.shape)[:, :k].reshape(x.shape)


def linear_a8_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The plain path: x (..., K) rounded to int8 blocks, then x @ weight^T (weight (N, K) float)."""
    return F.linear(fake_quantize_rows(x).to(weight.dtype), weight)


class PackedWeight(NamedTuple):
    """A weight in the kernel's layout (see the .cpp): ``u`` uint8 (N, K*bits/8), ``ab`` (N, G/r, 2)."""
    u: torch.Tensor
    ab: torch.Tensor
    bits: int
    r: int


def pack(q: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], bits: int) -> PackedWeight:
    """Integer weights q (N, K) with w = a * q + b per group -> the kernel's layout.

    q: int8 values in [-127, 127] (bits=8) or 0..15 (bits=4); a, b (N, Gw) float, each group
    spanning K / Gw inputs (b None: 0). K / Gw must be a multiple of 32 (the caller pads K to
    whole groups; padded inputs meet zero activations).
    """
    n, k = q.shape
    a = a.float().reshape(n, -1)
    b = torch.zeros_like(a) if b is None else b.float().reshape(n, -1)
    group = k // a.shape[1]
    if group * a.shape[1] != k or group % QK:
        raise ValueError(f"int8-activation kernel: groups of {k}/{a.shape[1]} inputs are not whole blocks of {QK}")
    if bits == 8:                             # unsigned bytes: u = q + 128, so b becomes b - 128 a
        u, b = (q.to(torch.int16) + 128).to(torch.uint8), b - 128 * a
    else:                                     # 16 bytes per block: value j low, value j + 16 high
        blocks = q.to(torch.uint8).reshape(n, k // QK, 2, QK // 2)
        u = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)
    return PackedWeight(u.contiguous(), torch.stack([a, b], -1).contiguous(), bits, group // QK)


def linear_a8(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x (M, K) float32 on the CPU @ W^T -> (M, N) with the kernel (check ``why_unavailable`` first)."""
    k = w.u.shape[1] * 8 // w.bits
    x = F.pad(x, (0, k - x.shape[1])) if x.shape[1] != k else x
    return _state["module"].linear_a8(x.float().contiguous(), w.u, w.ab, w.bits, w.r)
