"""int4 weight-only quantization: asymmetric, one (scale, min) pair per group of inputs.

    scale = (hi - lo) / 15;   q = round((w - lo) / scale) in 0..15;   w ~= q * scale + min

Stored: ``packed`` uint8 (N, ceil(K / 2)), ``scale`` and ``minimum`` bf16 (N, G). min is rounded
down and scale up, so |w - w'| <= scale / 2. gpt-fast ``quantize.py`` (``WeightOnlyInt4Linear``),
torchao ``quant_primitives.py``, llama.cpp ``quantize_row_q4_1``. Details: docs/quantization.md.
"""
import torch
import torch.nn.functional as F

QMAX = 15                                  # 4 bits: levels 0 .. 15


# --- Two 4-bit values per byte ---
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) integers in 0..15 -> uint8 (..., ceil(K / 2)): byte j = q[2j] | (q[2j + 1] << 4), an odd K
    padded with a 0 nibble. (GGUF pairs value j with j + 16 of its block instead: kernels must know.)"""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    q = q.to(torch.uint8)
    if bool((q > QMAX).any()):
        raise ValueError("pack_int4: values must lie in 0..15")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (..., ceil(k / 2)) -> uint8 (..., k): the inverse of ``pack_int4``."""
    low, high = packed & 0x0F, packed >> 4                     # (..., K/2) each
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :k]


# --- Quantize / dequantize ---
def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, g); a short last group is filled by repeating its last value,
    which leaves that group's min and max unchanged."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = F.pad(w[None], (0, pad), mode="replicate")[0]
    return w.reshape(n, -1, group_size)


def _step(x: torch.Tensor, towards: float) -> torch.Tensor:
    """The next representable value of x's dtype in the direction of ``towards``."""
    return torch.nextafter(x, torch.full_like(x, towards))


def _fields(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group lo, hi (float32) -> (scale, min) in ``dtype`` with
    min <= lo and min + 15 * scale >= hi, evaluated exactly as dequantize does."""
    minimum = lo.to(dtype)
    minimum = torch.where(minimum.float() > lo, _step(minimum, -float("inf")), minimum)
    m = minimum.float()
    scale = ((hi - m) / QMAX).to(dtype)
    for _ in range(8):                         # one step up is almost always enough
        short = scale.float() * QMAX + m < hi
        if not bool(short.any()):
            break
        scale = torch.where(short, _step(scale, float("inf")), scale)
    return scale, minimum


def quantize_int4(w: torch.Tensor, group_size: int = 32, field_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K) -> (packed uint8 (N, ceil(K/2)), scale (N, G), minimum (N, G)), scale and min stored in
    ``field_dtype`` (float32: exact for data already on a 4-bit grid)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int4 expects a 2-D weight (out_features, in_features), "
                         f"got shape {tuple(w.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    w = w.detach().float()
    if not bool(w.isfinite().all()):
        raise ValueError("quantize_int4: the weight has inf or NaN values")
    n, k = w.shape
    groups = _grouped(w, group_size)                               # (N, G, g)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)              # (N, G) each
    scale, minimum = _fields(lo, hi, field_dtype)                  # (N, G) each
    s, m = scale.float()[..., None], minimum.float()[..., None]    # (N, G, 1)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))         # a constant group: q = 0
    q = torch.round((groups - m) * inv).clamp(0, QMAX)             # (N, G, g)
    q = q.reshape(n, -1)[:, :k]                                    # (N, K)
    return pack_int4(q), scale, minimum


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    group_size: int, in_features: int) -> torch.Tensor:
    """-> W float32 (N, K): q * scale + min, each group with its own pair."""
    q = unpack_int4(packed, in_features).float()                   # (N, K)
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :in_features]    # (N, K)
    m = minimum.float().repeat_interleave(group_size, dim=1)[:, :in_features]  # (N, K)
    return q * s + m


def int4_nbytes(out_features: int, in_features: int, group_size: int,
                field_bytes: int = 2) -> int:
    """Bytes of the stored format: half a byte per weight, a (scale, min) pair per group."""
    g = num_groups(in_features, group_size)
    return out_features * ((in_features + 1) // 2) + 2 * field_bytes * out_features * g
