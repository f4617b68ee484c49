"""A Llama decoder layer in two C++ calls (``cpu_fused_layer.cpp``) for float32 and -a8 linears on the CPU:
norms, RoPE, SwiGLU and residuals with no per-op dispatch; float32 rows through a GEMV that streams the
weights. ``prepare_fused_layers`` (run by ``load_model`` for float32, ``quantize_model`` for -a8) sets
``DecoderLayer.fused`` and ``Transformer.fused_head``; ``why_not`` says why a layer keeps the plain
path. Tested equal to it: tests/test_fused_layer.py; figures: docs/kernels.md.
"""
from pathlib import Path
from typing import Optional

import torch

from minfer.kernels.cpu_quant_linear import load_a8_kernel
from minfer.kernels.onednn_linear import PackedLinear

_SOURCE = Path(__file__).with_name("cpu_fused_layer.cpp")
_state: dict = {}


def why_unavailable() -> Optional[str]:
    """None when the fused kernel runs on this CPU; otherwise the reason (building it on first call)."""
    return load_a8_kernel(_state, _SOURCE, "CPU fused decoder-layer kernel")


def _linears(layer) -> list:
    """Its four linears, through ``_modules`` (nn.Module's ``__getattr__`` costs ~0.7 us; this runs every step)."""
    attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
    return [attn[layer.self_attn.fused_name or "q_proj"], attn["o_proj"],
            mlp[layer.mlp.fused_name or "gate_proj"], mlp["down_proj"]]


def _fp32(lin) -> bool:
    fp32 = isinstance(lin, (torch.nn.Linear, PackedLinear)) and lin.weight.dtype == torch.float32
    return fp32 and lin.bias is None


def why_not(layer) -> Optional[str]:
    """None when ``layer`` can take the fused path (Llama family, float32 or a8 linears, on the CPU)."""
    attn, cfg = layer.self_attn, layer.self_attn.cfg
    if layer.sandwich or cfg.qk_norm or attn.q_scale != 1.0 or layer.mlp.geglu or cfg.norm_offset:
        return "the fused layer is Llama's (no sandwich / q-k norms, query scale or GeGLU, as Gemma has)"
    if not attn.owns_kv or attn.fused_name is None or layer.mlp.fused_name is None:
        return "the fused layer needs stacked qkv_proj / gate_up_proj and its own K/V"
    if layer.input_layernorm.weight.device.type != "cpu" or layer.input_layernorm.weight.dtype != torch.float32:
        return "the fused layer runs in float32 on the CPU"
    if all(_fp32(lin) for lin in _linears(layer)):       # float32: wherever the kernel builds
        return None if why_unavailable() is None or "module" in _state else _state["why"]
    for lin in _linears(layer):
        if not (getattr(lin, "act8", False) and lin.bias is None):      # a QuantizedLinear, -a8
            return "the fused layer needs float32 or int8-activation (-a8) linears without bias"
        if lin.path == "reference":
            return "path='reference'"
    if why := why_unavailable():
        return why
    for lin in _linears(layer):
        if lin.packed_a8().u.shape[1] * 8 // lin.packed_a8().bits != lin.in_features:
            return f"{lin.format}-a8 pads the inputs of a {lin.in_features}-wide linear"
    return None


def one_buffer(tensors: list) -> list:
    """Copies of ``tensors`` end to end in one buffer that starts on a 2 MB boundary, as views of it.
    A layer's weights then stream from 2 MB pages: torch's allocator does not align, so a tensor's
    ends (and small tensors whole) lie on 4 KB pages, and a GEMV over them reads ~15% slower
    (docs/kernels.md). llama.cpp reads all its weights from one mapped file."""
    sizes = [-(-t.nbytes // 64) * 64 for t in tensors]
    buf, out = torch.empty(sum(sizes) + (2 << 20), dtype=torch.uint8), []   # bytes before o: never touched
    o = -buf.data_ptr() % (2 << 20)
    for t, n in zip(tensors, sizes):
        out.append(buf[o:o + t.nbytes].view(t.dtype).view(t.shape).copy_(t))
        o += n
    return out


class FusedLayer:
    """Stands in for ``DecoderLayer.forward`` (it returns None to hand an input back to the plain path)."""

    def __init__(self, layer):
        self.layer, self.linears = layer, _linears(layer)
        cfg = layer.self_attn.cfg
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.eps, self.alone = cfg.rms_norm_eps, cfg.kv_share_group == 1   # alone: no later layer reads its view
        self.norms, self.attn = (layer.input_layernorm, layer.post_attention_layernorm), (
            layer.self_attn.kv_layer, layer.self_attn.window)
        self._packed: list = []
        lin = self.linears[0]                    # the rows that the plain path gives to oneDNN stay there
        self.onednn_rows = (lin.rows or (1, 1 << 62)) if isinstance(lin, PackedLinear) else (1, 0)
        if _fp32(lin) and len({x.weight.untyped_storage().data_ptr() for x in self.linears}) > 1:
            for x, w in zip(self.linears, one_buffer([x.weight.detach() for x in self.linears])):
                x.weight.data = w

    def _weights(self) -> Optional[tuple]:
        """The linears as the C++ calls take them; a8: packed, rebuilt when one repacked (``.to()``, a load)."""
        if _fp32(self.linears[0]):
            w = [lin.weight for lin in self.linears for _ in (0, 1)]
            return w[:2], [0, 0], w[2:], [0] * 6
        packed = [lin._fast.get("a8") for lin in self.linears]
        if len(packed) != len(self._packed) or any(a is not b for a, b in zip(packed, self._packed)):
            if any(lin.path == "reference" for lin in self.linears):
                return None
            packed = [lin.packed_a8() for lin in self.linears]
            views = iter(one_buffer([t for p in packed for t in (p.u, p.ab)]))
            self._packed = packed = [p._replace(u=next(views), ab=next(views)) for p in packed]
            for lin, p in zip(self.linears, packed):
                lin._fast["a8"] = p
            w, br = [t for p in packed for t in (p.u, p.ab)], [i for p in packed for i in (p.bits, p.r)]
            self._args = (w[:2], br[:2], w[2:], br[2:])
        return self._args

    def __call__(self, x, cos, sin, positions, kv_cache, view, backend):
        lo, hi = self.onednn_rows
        swapped = any(a is not b for a, b in zip(_linears(self.layer), self.linears))
        if lo <= x.numel() // x.shape[-1] <= hi or swapped:
            return None                                     # oneDNN's rows, or a linear swapped since
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad or (w := self._weights()) is None:
            return None
        kernel, (norm_in, norm_out), (kv_layer, window) = _state["module"], self.norms, self.attn
        args = (x, norm_in.weight, self.eps, w[0], w[1], cos, sin, *self.heads)
        in_place = getattr(kv_cache, "in_place", None) if x.shape[1] <= 8 and self.alone else None
        if in_place and (found := in_place(kv_layer, positions, backend)):     # decode: all in the call
            out = getattr(kernel, found[0])(*args, *found[1], window or 0)              # (B*T, nh*hd)
            return kernel.attn_out_mlp(x, out, norm_out.weight, self.eps, w[2], w[3]), None
        q, k, v = kernel.attn_in(*args)                        # (B, nh, T, hd), (B, nkv, T, hd) x 2
        view = kv_cache.update(kv_layer, k, v, positions)
        out = kv_cache.attend(kv_layer, q, view, positions, backend, window=window)
        return kernel.attn_out_mlp(x, out, norm_out.weight, self.eps, w[2], w[3]), view


def _head_gemv(model, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits of one row (x (1, 1, h)) by the GEMV, when the LM head is float32 (tied or not); else None."""
    head = getattr(model, "lm_head", None)
    w = model.model.embed_tokens.weight if head is None else head.weight if _fp32(head) else None
    if w is None or x.numel() != w.shape[1] or not x.is_cpu or x.dtype != w.dtype or x.requires_grad:
        return None
    return _state["module"].linear_f32(x.reshape(1, -1), w).view(*x.shape[:-1], -1)


def prepare_fused_layers(model, enabled: bool = True) -> Optional[str]:
    """Give each decoder layer that can take it the fused path, and the LM head the GEMV if all can (or
    take them away: ``enabled=False``). Returns None when every layer has it, else the first reason why not."""
    first = None
    for layer in model.model.layers:
        why = why_not(layer) if enabled else "switched off"
        layer.fused = FusedLayer(layer) if why is None else None
        first = first or why
    model.fused_head = _head_gemv if first is None else None
    return first
