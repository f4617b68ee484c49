"""Quantize a whole model: swap its linear layers (``quantize_model``), save and load the result.

Formats: int8 (``int8.py``), int4-gN (``int4.py``), q8_0 / q4_0 / q4_1 (``gguf_formats.py``);
FORMAT-a8 (w8a8, w4a8): the same weights with int8 activations (``kernels/cpu_quant_linear.py``).
The decoder's linears are swapped; ``lm_head`` ("int8" default, "same", None) decides the head.
The checkpoint's metadata names each module's format, as vLLM reads a checkpoint's
``quantization_config`` (``vllm/model_executor/layers/quantization/__init__.py``).
Details: docs/quantization.md.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from minfer.atomic import atomic_path
from minfer.config import ModelConfig
from minfer.quant.linear import GGUFLinear, Int4Linear, Int8Linear, QuantizedLinear

META_FORMATS = "minfer.quantization"
META_CONFIG = "minfer.config"
META_DTYPE = "minfer.dtype"
GGUF_NAMES = ("q8_0", "q4_0", "q4_1")


@dataclass(frozen=True)
class QuantSpec:
    """A parsed format name: kind "int8" | "int4" | "q8_0" | "q4_0" | "q4_1", group size for int4,
    act8: int8 activations (kernels/cpu_quant_linear.py)."""

    kind: str
    group_size: Optional[int] = None
    act8: bool = False

    @property
    def name(self) -> str:
        return (f"int4-g{self.group_size}" if self.kind == "int4" else self.kind) + ("-a8" if self.act8 else "")


def parse_spec(spec: str | QuantSpec, group_size: Optional[int] = None) -> QuantSpec:
    """"int8" / "int4-g64" / "q4_1" ... -> QuantSpec (``group_size``: a bare "int4"'s, default 32); a
    ValueError names the choices."""
    if isinstance(spec, QuantSpec):
        return spec
    s = str(spec).strip().lower()
    s = {"w8a8": "int8-a8", "w4a8": "int4-a8"}.get(s, s)
    if s.endswith("-a8"):
        base = parse_spec(s[:-3], group_size)
        if (base.group_size or 32) % 32:
            raise ValueError(f"{spec!r}: int8 activations need int4 groups of a multiple of 32, not {base.group_size}")
        return QuantSpec(base.kind, base.group_size, act8=True)
    m = re.fullmatch(r"int4(?:-g(\d+))?", s)
    if m:
        g = int(m.group(1)) if m.group(1) else (group_size or 32)
        if m.group(1) and group_size and group_size != g:
            raise ValueError(f"quantization {spec!r} says group size {g} but group_size={group_size}")
        if g < 2:
            raise ValueError(f"int4 group size must be at least 2, got {g}")
        return QuantSpec("int4", g)
    if group_size is not None:
        raise ValueError(f"group_size applies to int4 only, not to {spec!r}")
    if s in ("int8",) + GGUF_NAMES:
        return QuantSpec(s)
    raise ValueError(f"unknown quantization {spec!r}; choose int8, int4, int4-gN (N = group size, "
                     f"e.g. int4-g64), q8_0, q4_0 or q4_1, each with -a8 for int8 activations (w8a8, w4a8)")


def quantize_weight(weight: torch.Tensor, spec: str | QuantSpec, bias=None, **kw) -> QuantizedLinear:
    """One float weight (N, K) -> the quantized linear module of ``spec``."""
    spec = parse_spec(spec)
    kw = {**kw, "act8": spec.act8}
    if spec.kind == "int8":
        return Int8Linear.from_float(weight, bias, **kw)
    if spec.kind == "int4":
        return Int4Linear.from_float(weight, bias, group_size=spec.group_size, **kw)
    if weight.shape[1] % 32:
        raise ValueError(f"{spec.name} needs in_features to be a multiple of 32, got {weight.shape[1]}")
    return GGUFLinear.from_float(weight, bias, qtype=spec.kind.upper(), **kw)


def _empty_module(spec: QuantSpec, out_features: int, in_features: int, bias: bool) -> QuantizedLinear:
    """A quantized module with the right buffer shapes and dummy contents (to load into)."""
    return quantize_weight(torch.zeros(out_features, in_features), spec,
                           torch.zeros(out_features) if bias else None)


def _decoder_linears(model: nn.Module):
    """(parent module, attribute, HF names) of every nn.Linear in the decoder layers. A fused
    linear stands for several HF ones: ``qkv_proj`` -> [``...q_proj``, ``...k_proj``, ``...v_proj``]."""
    for name, module in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        for attr, child in module.named_children():
            if isinstance(child, nn.Linear):
                parts = module.parts if attr == getattr(module, "fused_name", None) else [attr]
                yield module, attr, [f"{name}.{part}" for part in parts]


def _head_weight(model: nn.Module) -> Optional[torch.Tensor]:
    head = getattr(model, "lm_head", None)
    if isinstance(head, QuantizedLinear):
        return None                                   # already done
    if isinstance(head, nn.Linear):
        return head.weight
    return model.model.embed_tokens.weight            # tied


def quantize_model(model: nn.Module, spec: str | QuantSpec, lm_head: Optional[str] = "int8",
                   path: str = "auto", compute_dtype: Optional[torch.dtype] = torch.bfloat16) -> nn.Module:
    """Swap the decoder's linear layers (and the LM head, see ``lm_head``) in place -> the model, with
    ``model.quantization`` = {module name: format name}. ``path`` / ``compute_dtype``: every module's
    (``linear.py``). oneDNN-prepacked linears (``LLM``'s CPU default) are unpacked first."""
    spec = parse_spec(spec)
    from minfer.kernels.onednn_linear import unpack_linears
    unpack_linears(model)
    head_spec = None if lm_head in (None, "none") else spec if lm_head == "same" else parse_spec(lm_head)
    if head_spec is not None and spec.act8:            # the head takes the body's activations
        head_spec = QuantSpec(head_spec.kind, head_spec.group_size, act8=True)
    formats: dict[str, str] = dict(getattr(model, "quantization", {}) or {})
    kw = {"path": path, "compute_dtype": compute_dtype}
    for parent, attr, names in list(_decoder_linears(model)):
        old = getattr(parent, attr)
        setattr(parent, attr, quantize_weight(old.weight, spec, old.bias, **kw))
        formats.update(dict.fromkeys(names, spec.name))
    weight = _head_weight(model)
    if head_spec is not None and weight is not None:
        model.lm_head = quantize_weight(weight, head_spec, **kw)
        formats["lm_head"] = head_spec.name
    model.quantization = formats
    _prepare_fused(model, formats)
    return model


def _prepare_fused(model: nn.Module, formats: dict) -> None:
    """-a8 formats on the CPU: decoder layers in two C++ calls where they can (kernels/cpu_fused_layer.py)."""
    if any(f.endswith("-a8") for f in formats.values()):
        from minfer.kernels.cpu_fused_layer import prepare_fused_layers
        prepare_fused_layers(model)


def describe(model: nn.Module) -> str:
    """"int4-g32 (lm_head int8)" style summary of a model's quantization ("none" if float)."""
    formats = dict(getattr(model, "quantization", {}) or {})
    if not formats:
        return "none"
    head = formats.pop("lm_head", None)
    body = ", ".join(sorted(set(formats.values()))) or "float"
    return body + (f" (lm_head {head})" if head else " (lm_head float)")


# --- Save / load ---
def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the quantized model to one safetensors file (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    formats = getattr(model, "quantization", None)
    if not formats:
        raise ValueError("save_quantized: the model is not quantized (run quantize_model first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", META_FORMATS: json.dumps(formats, sort_keys=True),
            META_CONFIG: json.dumps(model.cfg.to_hf()),
            META_DTYPE: str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> Optional[dict]:
    """The safetensors metadata of ``path`` if it is a minfer quantized checkpoint, else None."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    return meta if META_FORMATS in meta else None


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True for a file (or a folder's model.safetensors) written by ``save_quantized``."""
    try:
        return read_metadata(path) is not None
    except (OSError, ValueError):
        return False


def load_quantized(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None,
                   path_mode: str = "auto") -> nn.Module:
    """Read a file written by ``save_quantized`` (or a folder holding model.safetensors): a meta-device
    skeleton, its linears swapped for empty quantized modules, the tensors loaded (no float copy of the
    quantized weights is made). ``dtype``: the float parts' (embedding, norms); default as saved."""
    from safetensors.torch import load_file

    from minfer.model import Transformer, rope_inv_freq

    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    meta = read_metadata(file)
    if meta is None:
        raise ValueError(f"{file}: not a minfer quantized checkpoint (no {META_FORMATS!r} metadata)")
    try:
        cfg = ModelConfig.from_hf(json.loads(meta[META_CONFIG]))
        formats: dict[str, str] = json.loads(meta[META_FORMATS])
        for spec in formats.values():
            parse_spec(spec)
    except (KeyError, TypeError, ValueError, AttributeError) as e:     # JSONDecodeError is a ValueError
        raise ValueError(f"{file}: invalid quantization metadata ({type(e).__name__}: {e})") from None
    float_dtype = dtype or getattr(torch, str(meta.get(META_DTYPE, "float32")), None)
    if not isinstance(float_dtype, torch.dtype):
        raise ValueError(f"{file}: invalid dtype {meta.get(META_DTYPE)!r} in its metadata")
    tensors = load_file(str(file))
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    for parent, attr, names in list(_decoder_linears(model)):
        specs = {formats.get(name) for name in names}
        if len(specs) > 1:
            raise ValueError(f"{file}: {', '.join(names)} are stacked into one {attr}, so they need one "
                             f"format; the metadata gives {sorted(map(str, specs))}")
        if None not in specs:
            old = getattr(parent, attr)
            setattr(parent, attr, _empty_module(parse_spec(specs.pop()), old.out_features,
                                                old.in_features, old.bias is not None))
    if "lm_head" in formats:
        model.lm_head = _empty_module(parse_spec(formats["lm_head"]), cfg.vocab_size, cfg.hidden_size, False)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:                          # a tensor of the wrong shape
        raise ValueError(f"{file}: tensors do not fit the recorded config/formats: "
                         f"{' '.join(str(e).split())[:500]}") from None
    if missing or unexpected:
        raise ValueError(f"{file}: tensors do not fit the recorded config/formats: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.inv_freq = rope_inv_freq(cfg)
    for p in model.parameters():                       # embedding and norms; quantized parts are buffers
        p.data = p.data.to(float_dtype)
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            mod.path = path_mode
    model.quantization = formats
    model = model.to(device).eval().requires_grad_(False)
    _prepare_fused(model, formats)
    return model


def load_quantized_folder(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None):
    """A folder written by ``minfer quantize`` (or its model.safetensors) -> (config, model, tokenizer)."""
    from minfer.tokenizer import Tokenizer

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    model = load_quantized(path, device=device, dtype=dtype)
    return model.cfg, model, Tokenizer.from_folder(folder)
