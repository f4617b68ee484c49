"""GGUF block formats, decoded in plain PyTorch, bit-identical to llama.cpp.

Every function takes ``blocks``, uint8 (n_blocks, bytes_per_block), little-endian, and returns
float32 (n_blocks, values_per_block), computed in llama.cpp's order. llama.cpp:
``ggml/src/ggml-quants.c`` (``dequantize_row_q4_1`` ...), ``ggml/src/ggml-common.h``;
gguf-py ``gguf/quants.py`` (the tests match it bit for bit). The table of formats, the
super-blocks and what "Q4_K_M" means: docs/quantization.md.
"""
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def _f16(field: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian half floats -> (n, 1) float32."""
    return field.contiguous().view(torch.float16).float()


def _low_high_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 -> (..., 2k): all low nibbles, then all high ones. Q4_0/Q4_1/Q4_K pack value j in the
    low 4 bits of byte j and value j + k in its high 4 bits (not two neighbours)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _float_type(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoder of an unquantized type (F32, F16, BF16): the bytes viewed as ``dtype``, as float32."""
    return lambda blocks: blocks.contiguous().view(dtype).to(torch.float32, copy=True)


# --- 32-value blocks ---
def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes per 32 values (llama.cpp ``block_q8_0``).

        bytes 0-1   d       f16 scale
        bytes 2-33  qs[32]  int8 values
        x[i] = d * qs[i]
    """
    d = _f16(blocks[:, 0:2])                                  # (n, 1)
    q = blocks[:, 2:34].contiguous().view(torch.int8).float()  # (n, 32)
    return q * d


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes per 32 values (llama.cpp ``block_q4_0``).

        bytes 0-1   d       f16 scale
        bytes 2-17  qs[16]  byte j = value j (low nibble) | value j+16 (high nibble)
        x[i] = d * (q[i] - 8)          q in 0..15, so x in d*[-8, 7]
    """
    d = _f16(blocks[:, 0:2])                                  # (n, 1)
    q = _low_high_nibbles(blocks[:, 2:18]).to(torch.int8) - 8  # (n, 32)
    return d * q.float()


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 bytes per 32 values (llama.cpp ``block_q4_1``).

        bytes 0-1   d       f16 scale  (max - min) / 15
        bytes 2-3   m       f16 offset (the block minimum)
        bytes 4-19  qs[16]  byte j = value j (low nibble) | value j+16 (high nibble)
        x[i] = d * q[i] + m            q in 0..15, so x in [m, m + 15 d]
    """
    d = _f16(blocks[:, 0:2])                                  # (n, 1)
    m = _f16(blocks[:, 2:4])                                  # (n, 1)
    q = _low_high_nibbles(blocks[:, 4:20]).float()            # (n, 32)
    return d * q + m


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22 bytes per 32 values (llama.cpp ``block_q5_0``).

        bytes 0-1   d       f16 scale
        bytes 2-5   qh      uint32 (little-endian): bit i is the 5th (high) bit of value i
        bytes 6-21  qs[16]  byte j = low 4 bits of value j (low nibble) | of value j+16 (high nibble)
        x[i] = d * (q[i] - 16)         q in 0..31, so x in d*[-16, 15]
    """
    d = _f16(blocks[:, 0:2])                                  # (n, 1)
    qh = blocks[:, 2:6].to(torch.int64)                       # (n, 4) bytes of the uint32
    bits = torch.arange(8, dtype=torch.int64)                 # bit i of byte b is value 8b + i
    high = ((qh.unsqueeze(-1) >> bits) & 1).reshape(-1, 32)   # (n, 32) high bits, value order
    low = _low_high_nibbles(blocks[:, 6:22]).to(torch.int64)  # (n, 32) low 4 bits, value order
    q = (low | (high << 4)) - 16                              # (n, 32) in -16..15
    return d * q.float()


# --- 256-value "K" super-blocks ---
def _q4_k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins (llama.cpp ``get_scale_min_k4``).

        byte:  0..3              4..7              8..11
               [s4 hi2|s0..3]    [m4 hi2|m0..3]    [m4 lo4|s4 lo4]   (for sub-blocks 4..7)

    Sub-blocks 0-3: scale and min in the low 6 bits of bytes 0-3 and 4-7. Sub-blocks 4-7: their low 4 bits
    in the nibbles of bytes 8-11, their high 2 bits in the top bits of bytes 0-3 (scale) and 4-7 (min)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]   # (n, 4) each
    scales = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)  # (n, 8)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)       # (n, 8)
    return scales.float(), mins.float()


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144 bytes per 256 values (llama.cpp ``block_q4_K``).

        bytes 0-1     d          f16 super-scale for the scales
        bytes 2-3     dmin       f16 super-scale for the mins
        bytes 4-15    scales[12] eight (scale, min) pairs, 6 bits each, see above
        bytes 16-143  qs[128]    4 chunks of 32 bytes; chunk c holds sub-block 2c
                                 in its low nibbles and sub-block 2c+1 in its high
        x = (d * scale_s) * q - (dmin * min_s)     for sub-block s of 32 values
    """
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])                                  # (n, 1)
    dmin = _f16(blocks[:, 2:4])                               # (n, 1)
    sc, mn = _q4_k_scales_and_mins(blocks[:, 4:16])           # (n, 8) each
    scale = (d * sc).unsqueeze(-1)                            # (n, 8, 1)
    offset = (dmin * mn).unsqueeze(-1)                        # (n, 8, 1)
    chunks = blocks[:, 16:144].reshape(n, 4, 32)              # (n, 4, 32)
    q = torch.stack([chunks & 0x0F, chunks >> 4], dim=2)      # (n, 4, 2, 32)
    q = q.reshape(n, 8, 32).float()                           # (n, 8 sub-blocks, 32)
    return (scale * q - offset).reshape(n, 256)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210 bytes per 256 values (llama.cpp ``block_q6_K``).

        bytes 0-127    ql[128]    low 4 bits of each value
        bytes 128-191  qh[64]     high 2 bits, four values per byte
        bytes 192-207  scales[16] int8 scale per sub-block of 16 values
        bytes 208-209  d          f16 super-scale
        x = (d * scales[i // 16]) * (q - 32)       q in 0..63

    The 256 values are two halves of 128. In half h, with l in 0..31:
        value l      : low nibble of ql[64h + l]      | bits 0-1 of qh[32h + l]
        value l + 32 : low nibble of ql[64h + 32 + l] | bits 2-3 of qh[32h + l]
        value l + 64 : high nibble of ql[64h + l]     | bits 4-5 of qh[32h + l]
        value l + 96 : high nibble of ql[64h + 32 + l]| bits 6-7 of qh[32h + l]
    """
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)                # (n, half, which 32 bytes, l)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)              # (n, half, 1, l)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = _f16(blocks[:, 208:210])                              # (n, 1)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)              # (n, half, 4 groups of 32, l)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 0x03                              # (n, half, 4, l)
    q = (low | (high << 4)).to(torch.int8) - 32               # (n, 2, 4, 32) in -32..31
    q = q.reshape(n, 16, 16).float()                          # (n, 16 sub-blocks, 16)
    scale = (d * scales).unsqueeze(-1)                        # (n, 16, 1)
    return (scale * q).reshape(n, 256)


# --- The table ---
@dataclass(frozen=True)
class BlockFormat:
    """How one GGUF type is laid out: values per block, bytes per block, decoder."""
    name: str
    block_size: int                                   # values per block
    type_size: int                                    # bytes per block
    dequantize: Callable[[torch.Tensor], torch.Tensor]


FORMATS: dict[str, BlockFormat] = {f.name: f for f in [
    BlockFormat("F32", 1, 4, _float_type(torch.float32)),
    BlockFormat("F16", 1, 2, _float_type(torch.float16)),
    BlockFormat("BF16", 1, 2, _float_type(torch.bfloat16)),
    BlockFormat("Q8_0", 32, 34, dequantize_q8_0),
    BlockFormat("Q4_0", 32, 18, dequantize_q4_0),
    BlockFormat("Q4_1", 32, 20, dequantize_q4_1),
    BlockFormat("Q5_0", 32, 22, dequantize_q5_0),
    BlockFormat("Q4_K", 256, 144, dequantize_q4_k),
    BlockFormat("Q6_K", 256, 210, dequantize_q6_k),
]}


def get_format(qtype) -> BlockFormat:
    """Look up a format by ``gguf.GGMLQuantizationType`` or by name ("Q4_1")."""
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str) or name.upper() not in FORMATS:
        raise ValueError(
            f"GGUF tensor type {name!r} is not supported by minfer; "
            f"supported types: {', '.join(FORMATS)}")
    return FORMATS[name.upper()]


def dequantize(raw: torch.Tensor, qtype, shape: Sequence[int]) -> torch.Tensor:
    """Decode the raw bytes of one GGUF tensor (uint8 block bytes, or any tensor whose *bytes* are the data,
    as ``GGUFReader``'s float16 array of an F16 tensor) into float32 of ``shape`` (GGUF's ``ne`` reversed;
    rows quantized apart, so cols are whole blocks). ``qtype``: ``GGMLQuantizationType`` or its name."""
    fmt = get_format(qtype)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if shape and shape[-1] % fmt.block_size:
        raise ValueError(f"{fmt.name}: rows of {shape[-1]} values are not a whole number of "
                         f"{fmt.block_size}-value blocks (shape {shape})")
    data = raw.detach().contiguous().cpu()
    data = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    n_blocks = numel // fmt.block_size
    if data.numel() != n_blocks * fmt.type_size:
        raise ValueError(f"{fmt.name}: shape {shape} needs {n_blocks * fmt.type_size} bytes, "
                         f"got {data.numel()}")
    blocks = data.reshape(n_blocks, fmt.type_size)            # (n_blocks, bytes per block)
    return fmt.dequantize(blocks).reshape(shape)


# --- Quantizing (32-value blocks): the same bytes as gguf-py's ``gguf/quants.py`` (bit-exact with
# llama.cpp's ``quantize_row_q8_0_ref`` ...), the same float32 steps in the same order. Each maps
# float32 (n_blocks, 32) -> uint8 (n_blocks, bytes_per_block); why the f16 scale costs: docs/quantization.md.
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8: the little-endian bytes of the nearest half."""
    return x.to(torch.float16).view(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, with 0 where d == 0 (an all-zero block stores q = 0)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _pack_low_high(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0..15 -> (n, 16) bytes: byte j = q[j] | q[j + 16] << 4."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to even)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def quantize_q8_0(values: torch.Tensor) -> torch.Tensor:
    """Q8_0: d = max|x| / 127, qs = roundf(x / d); -> (n, 34) bytes [d f16 | qs int8 x 32]."""
    x = values.float()                                        # (n, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127               # (n, 1)
    qs = _round_half_away(x * _inverse(d)).to(torch.int8)     # (n, 32)
    return torch.cat([_f16_bytes(d), qs.view(torch.uint8)], dim=1)


def quantize_q4_0(values: torch.Tensor) -> torch.Tensor:
    """Q4_0: d = x[argmax |x|] / -8, q = trunc(x / d + 8.5) clipped to 0..15;
    -> (n, 18) bytes [d f16 | 16 bytes of nibbles]. The largest |x| maps to q = 0 (d * -8) exactly; the
    grid stops at d * 7 on the other side."""
    x = values.float()                                        # (n, 32)
    imax = x.abs().argmax(dim=1, keepdim=True)                # (n, 1), first on ties (as numpy)
    d = x.gather(1, imax) / -8                                # (n, 1), signed
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15)       # (n, 32)
    return torch.cat([_f16_bytes(d), _pack_low_high(q)], dim=1)


def quantize_q4_1(values: torch.Tensor) -> torch.Tensor:
    """Q4_1: d = (max - min) / 15, m = min, q = trunc((x - min) / d + 0.5) clipped to 0..15;
    -> (n, 20) bytes [d f16 | m f16 | 16 bytes of nibbles]."""
    x = values.float()                                        # (n, 32)
    hi = x.amax(dim=1, keepdim=True)                          # (n, 1)
    lo = x.amin(dim=1, keepdim=True)                          # (n, 1)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15)  # (n, 32)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_low_high(q)], dim=1)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": quantize_q8_0,
    "Q4_0": quantize_q4_0,
    "Q4_1": quantize_q4_1,
}


def quantize(values: torch.Tensor, qtype) -> torch.Tensor:
    """Encode a float tensor (..., K), K a multiple of 32, into GGUF block bytes
    uint8 (..., K // 32 * bytes_per_block): the layout ``gguf.quants.quantize`` returns."""
    fmt = get_format(qtype)
    if fmt.name not in QUANTIZERS:
        raise ValueError(f"quantizing to {fmt.name} is not supported; "
                         f"supported: {', '.join(QUANTIZERS)}")
    k = values.shape[-1]
    if k % fmt.block_size:
        raise ValueError(f"{fmt.name}: the last dimension ({k}) must be a multiple of "
                         f"{fmt.block_size}")
    blocks = values.detach().float().cpu().reshape(-1, fmt.block_size)   # (n_blocks, 32)
    out = QUANTIZERS[fmt.name](blocks)                        # (n_blocks, bytes per block)
    return out.reshape(*values.shape[:-1], k // fmt.block_size * fmt.type_size)
