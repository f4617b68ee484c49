"""Quantized ``nn.Linear`` replacements, each with two execution paths.

    reference path   W = dequantize(stored)  (N, K) float32, then y = x @ W^T + b (any device)
    fast path        one fused kernel that reads the packed weights directly:
                     int8          torch.ops.aten._weight_int8pack_mm        (CPU)
                     int4, Q4_0,   torch.ops.aten._weight_int4pack_mm_for_cpu (CPU)
                     Q4_1          torch.ops.aten._weight_int4pack_mm         (CUDA, "tinygemm")
                     Q8_0          none in torch: always the reference path

``act8=True`` (formats ending in ``-a8``) rounds the activations to int8 too and runs
``minfer/kernels/cpu_quant_linear.py`` on ``int_form()``. ``path="auto"`` takes the fast path where
torch has a kernel for the device and shape; each kernel is checked once per (device, dtype)
against the reference and never used if it disagrees. The fast path runs in ``compute_dtype``
(bfloat16 by default). Why, and how tinygemm reads a group: docs/quantization.md.
vLLM: ``vllm/model_executor/layers/linear.py`` (``LinearBase`` with a ``quant_method``) and
``layers/quantization/``; gpt-fast ``quantize.py``; torchao ``dtypes/uintx/``.
"""
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from minfer.kernels.cpu_quant_linear import linear_a8, linear_a8_reference, why_unavailable
from minfer.kernels.cpu_quant_linear import pack as pack_a8
from minfer.quant import gguf_formats
from minfer.quant.int4 import dequantize_int4, num_groups, quantize_int4, unpack_int4
from minfer.quant.int8 import dequantize_int8, quantize_int8

PATHS = ("auto", "reference", "fast")
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


# --- The kernels, and a one-time check that each works here ---
def _tinygemm_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """scale, zero (N, G) -> (G, N, 2) in ``dtype``, the layout the int4 kernels read."""
    return torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _pack_for_tinygemm(q: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """q (N, K) values 0..15 -> the kernel's opaque packed layout on ``device`` (None: unsupported). CPU:
    ``_convert_weight_to_int4pack_for_cpu``, int32 (N, K), N % 16 == 0. CUDA: ``_convert_weight_to_int4pack``,
    uint8 (N, K/2), a pair's *first* value high, K % (16 * inner_k_tiles) == 0 and N % 8 == 0."""
    n, k = q.shape
    if device.type == "cpu":
        if n % 16:
            return None
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 8)
    if device.type == "cuda":
        tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
        if tiles is None or n % 8:
            return None
        q = q.to(torch.uint8)
        pairs = (q[:, 0::2] << 4) | q[:, 1::2]                            # (N, K/2)
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
    return None


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ dequant(packed)^T -> (M, N), on the device of x."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


def _int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q * scale)^T -> (M, N)."""
    return torch.ops.aten._weight_int8pack_mm(x, q, scale)


_KERNEL_OK: dict[tuple[str, str, torch.dtype], bool] = {}
_A8_WARNED: set[str] = set()


def _a8_why(device: torch.device) -> Optional[str]:
    """None when the int8-activation kernel runs for inputs on ``device``, else why not."""
    if device.type != "cpu":
        return f"the int8-activation kernel is for the CPU, the input is on {device.type}"
    return why_unavailable()


def _kernel_available(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Does the ``kind`` ("int8" / "int4") kernel run here and agree with the reference?
    Checked once per (kind, device type, dtype) on a 32 x 64 matrix."""
    key = (kind, device.type, dtype)
    if key not in _KERNEL_OK:
        ok = False
        try:
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(32, 64, generator=gen)
            x = torch.randn(3, 64, generator=gen).to(dtype)
            if kind == "int8":
                q, s = quantize_int8(w)
                want = x.float() @ dequantize_int8(q, s).t()
                got = _int8_mm(x.to(device), q.to(device), s.to(device, dtype))
            else:
                packed, s, m = quantize_int4(w, 32)
                want = x.float() @ dequantize_int4(packed, s, m, 32, 64).t()
                tg = _pack_for_tinygemm(unpack_int4(packed, 64).to(device), device)
                sz = _tinygemm_scales_and_zeros(s, m.float() + 8 * s.float(), dtype).to(device)
                got = _int4_mm(x.to(device), tg, 32, sz)
            err = float((got.float().cpu() - want).abs().max())
            ok = err <= 2e-2 * float(want.abs().max())
            if not ok:
                warnings.warn(f"minfer: the {kind} fast kernel on {device.type}/{dtype} disagrees with "
                              f"the reference (max error {err:.3g}); using the reference path")
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            ok = False                                  # no such kernel on this device / dtype
        _KERNEL_OK[key] = ok
    return _KERNEL_OK[key]


# --- The base class: path selection ---
class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored quantized. A format defines ``dequantize()`` (the reference) and
    ``_prepare_fast(device, dtype)``: a function x2d -> y2d on a fast kernel, or None."""

    format = "?"

    def __init__(self, in_features: int, out_features: int, bias: Optional[torch.Tensor] = None,
                 path: str = "auto", compute_dtype: Optional[torch.dtype] = torch.bfloat16, act8: bool = False):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.path = path
        self.compute_dtype = compute_dtype
        self.act8 = bool(act8)           # int8 activations: W8A8 / W4A8 (kernels/cpu_quant_linear.py)
        self._fast: dict = {}            # (device, dtype) -> callable or None, rebuilt after .to()

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {value!r}")
        self._path = value

    # -- to implement ---------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (out_features, in_features)."""
        raise NotImplementedError

    def _prepare_fast(self, device: torch.device, dtype: torch.dtype) -> Optional[Callable]:
        return None

    def int_form(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
        """(q (N, K'), a, b (N, G), bits): the weight is a * q + b per group of K' / G inputs, q
        integers (int8 in [-127, 127] or 0..15), K' = K padded to whole groups of a multiple of 32."""
        raise NotImplementedError

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight (packed values and scales; bias not included)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    # -- the two paths ---------------------------------------------------------
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)                                   # (N, K)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def fast_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The fused-kernel result, or None when no kernel fits this device / dtype / shape."""
        dtype = self.compute_dtype or x.dtype
        key = (x.device, dtype)
        if key not in self._fast:
            self._fast[key] = self._prepare_fast(x.device, dtype)
        kernel = self._fast[key]
        if kernel is None:
            return None
        lead = x.shape[:-1]
        y = kernel(x.reshape(-1, self.in_features).to(dtype))               # (M, N)
        y = y.reshape(*lead, self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def uses_fast_path(self, device="cpu", dtype=torch.float32) -> bool:
        """Would ``forward`` take the fast path for inputs on ``device`` / of ``dtype``?"""
        if self.path == "reference":
            return False
        if self.act8:
            return _a8_why(torch.device(device)) is None
        device, dtype = torch.device(device), self.compute_dtype or dtype
        key = (device, dtype)
        if key not in self._fast:
            self._fast[key] = self._prepare_fast(device, dtype)
        return self._fast[key] is not None

    def a8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Int8 activations: the C++ kernel where it runs, else its plain reference (same numbers)."""
        why = "path='reference'" if self.path == "reference" else _a8_why(x.device)
        if why is None:
            y = linear_a8(x.reshape(-1, self.in_features), self.packed_a8())           # (M, N) float32
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        elif self.path == "fast":
            raise RuntimeError(f"{type(self).__name__} ({self.format}-a8): no int8-activation kernel here: {why}")
        else:
            if why not in _A8_WARNED and self.path != "reference":
                _A8_WARNED.add(why)
                warnings.warn(f"minfer: int8-activation linears run on their plain torch path, more slowly: {why}")
            y = linear_a8_reference(x, self.dequantize().to(x.device)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def packed_a8(self):
        """The weight in the int8-activation kernel's layout (a ``PackedWeight``), made once per ``.to()``."""
        if "a8" not in self._fast:
            self._fast["a8"] = pack_a8(*self.int_form())
        return self._fast["a8"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act8:
            return self.a8_forward(x)
        if self.path != "reference":
            y = self.fast_forward(x)
            if y is not None:
                return y
            if self.path == "fast":
                raise RuntimeError(f"{type(self).__name__} ({self.format}): no fast kernel for "
                                   f"{x.device.type}/{self.compute_dtype or x.dtype} and shape "
                                   f"({self.out_features}, {self.in_features}); use path='auto'")
        return self.reference_forward(x)

    # -- keep the packed copies in step with the stored tensors ---------------
    def _apply(self, fn, *args, **kwargs):
        self._fast = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fast = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}{'-a8' if self.act8 else ''}, bias={self.bias is not None}, path={self.path}")


# --- int8, per output channel ---
class Int8Linear(QuantizedLinear):
    """Buffers: ``qweight`` int8 (N, K), ``scale`` float32 (N,)."""

    format = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias=None, **kw):
        super().__init__(qweight.shape[1], qweight.shape[0], bias, **kw)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias=None, **kw) -> "Int8Linear":
        q, scale = quantize_int8(weight)
        return cls(q.to(weight.device), scale.to(weight.device), bias, **kw)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def int_form(self):
        return F.pad(self.qweight, (0, -self.in_features % 32)), self.scale[:, None], None, 8

    def _prepare_fast(self, device, dtype):
        # The CPU kernel crashes (torch 2.13) in bf16 unless K % 16 == 0: stay away.
        if self.in_features % 16 or not _kernel_available("int8", device, dtype):
            return None
        # The kernel wants scales in the activation dtype: bf16 scales would scale each output channel by
        # its own (1 + up to 0.4%), an error that does not average out (SmolLM2's perplexity moved 0.5%).
        # So the kernel multiplies by ones and the float32 scale is applied to its output.
        q, scale = self.qweight, self.scale.float()
        ones = torch.ones(self.out_features, dtype=dtype, device=device)
        return lambda x: _int8_mm(x, q, ones) * scale                      # (M, N) float32


# --- int4, grouped, and the GGUF 4-bit formats that map onto the same kernel ---
def _tinygemm_kernel(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                     device: torch.device, dtype: torch.dtype) -> Optional[Callable]:
    """A fast int4 matmul for q (N, K) with w = (q - 8) * scale + zero per group; K is padded to whole
    groups (padded weight columns meet zero activations)."""
    n, k = q.shape
    if group_size not in TINYGEMM_GROUP_SIZES or not _kernel_available("int4", device, dtype):
        return None
    pad = num_groups(k, group_size) * group_size - k
    packed = _pack_for_tinygemm(F.pad(q, (0, pad), value=8).to(device), device)
    if packed is None:
        return None
    sz = _tinygemm_scales_and_zeros(scale, zero, dtype).to(device)         # (G, N, 2)
    if pad:
        return lambda x: _int4_mm(F.pad(x, (0, pad)), packed, group_size, sz)
    return lambda x: _int4_mm(x, packed, group_size, sz)


class Int4Linear(QuantizedLinear):
    """Buffers: ``qweight`` uint8 (N, ceil(K/2)), ``scale`` and ``minimum`` (N, G)."""

    format = "int4"

    def __init__(self, qweight, scale, minimum, group_size: int, in_features: int, bias=None, **kw):
        super().__init__(in_features, qweight.shape[0], bias, **kw)
        self.group_size = int(group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias=None, group_size: int = 32, **kw) -> "Int4Linear":
        packed, scale, minimum = quantize_int4(weight, group_size)
        dev = weight.device
        return cls(packed.to(dev), scale.to(dev), minimum.to(dev), group_size, weight.shape[1], bias, **kw)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.minimum, self.group_size, self.in_features)

    def int_form(self):
        pad = num_groups(self.in_features, self.group_size) * self.group_size - self.in_features
        q = F.pad(unpack_int4(self.qweight, self.in_features), (0, pad))    # (N, K')
        return q, self.scale.float(), self.minimum.float(), 4

    def _prepare_fast(self, device, dtype):
        q, s, m, _ = self.int_form()
        return _tinygemm_kernel(q[:, :self.in_features], s, m + 8 * s, self.group_size, device, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class GGUFLinear(QuantizedLinear):
    """The raw GGUF blocks of one matrix: ``blocks`` uint8 (N, K / 32 * bytes_per_block). Fast: Q4_0 and
    Q4_1 as tinygemm int4, group size 32, d rounded to bf16 (the tests bound it); Q8_0's per-block scales
    do not fit ``_weight_int8pack_mm`` (one per row): always the reference path."""

    def __init__(self, qtype: str, blocks: torch.Tensor, in_features: int, bias=None, **kw):
        super().__init__(in_features, blocks.shape[0], bias, **kw)
        self.fmt = gguf_formats.get_format(qtype)
        if self.fmt.name not in gguf_formats.QUANTIZERS:
            raise ValueError(f"GGUFLinear supports {', '.join(gguf_formats.QUANTIZERS)}, got {self.fmt.name}")
        self.format = self.fmt.name.lower()
        self.register_buffer("blocks", blocks)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias=None, qtype: str = "Q4_1", **kw) -> "GGUFLinear":
        blocks = gguf_formats.quantize(weight, qtype).to(weight.device)    # (N, K/32 * bytes)
        return cls(qtype, blocks, weight.shape[1], bias, **kw)

    def dequantize(self) -> torch.Tensor:
        return gguf_formats.dequantize(self.blocks, self.fmt.name,
                                       (self.out_features, self.in_features)).to(self.blocks.device)

    def int_form(self):
        n, k = self.out_features, self.in_features
        blocks = self.blocks.cpu().reshape(n * k // 32, self.fmt.type_size)   # (n_blocks, bytes)
        d = blocks[:, 0:2].contiguous().view(torch.float16).float().reshape(n, -1)   # (N, G)
        if self.fmt.name == "Q8_0":                                         # d * q
            return blocks[:, 2:34].contiguous().view(torch.int8).reshape(n, k), d, None, 8
        if self.fmt.name == "Q4_0":                                         # d * (q - 8)
            return gguf_formats._low_high_nibbles(blocks[:, 2:18]).reshape(n, k), d, -8 * d, 4
        m = blocks[:, 2:4].contiguous().view(torch.float16).float().reshape(n, -1)
        return gguf_formats._low_high_nibbles(blocks[:, 4:20]).reshape(n, k), d, m, 4   # d * q + m

    def _prepare_fast(self, device, dtype):
        q, d, b, bits = self.int_form()
        return None if bits == 8 else _tinygemm_kernel(q, d, b + 8 * d, 32, device, dtype)
