"""``load_model``: a name or folder -> (config, model ready to run, tokenizer), for every entry point.
A quantized folder loads as it is; otherwise ``load_checkpoint`` -> ``build_model`` -> ``quantize_model``,
then optional prepacking. vLLM: ``vllm/model_executor/model_loader`` (``get_model``); docs/architecture.md.
"""
from typing import NamedTuple

import torch
from torch import nn

from minfer.config import ModelConfig
from minfer.devices import resolve_device, resolve_dtype, warn_if_no_bf16_units


class LoadedModel(NamedTuple):
    config: ModelConfig
    model: nn.Module
    tokenizer: object           # minfer.tokenizer.Tokenizer


def load_model(model: str, *, device: str | torch.device | None = "cpu", dtype: str | torch.dtype = "float32",
               quantization: str | None = None, prepack: bool | None = False) -> LoadedModel:
    """Load ``model`` (registry name, HF folder, GGUF file, or a folder written by ``minfer quantize``).
    quantization  weight-only format for the linears (``minfer.quant``); refused for a quantized folder
    prepack       True: every CPU linear through oneDNN (``minfer/kernels/onednn_linear.py``); None: where
                  it applies (CPU), float32 for the batched rows only, bf16 with bf16 units for all; False: off"""
    from minfer.quant.apply import is_quantized_checkpoint, load_quantized_folder, parse_spec, quantize_model
    device, dtype = resolve_device(None if device is None else str(device)), resolve_dtype(dtype)
    warn_if_no_bf16_units(device, dtype)
    if quantization is not None:
        parse_spec(quantization)                                  # fail on a bad name before loading
    if is_quantized_checkpoint(model):                            # written by `minfer quantize`
        if quantization is not None:
            raise ValueError(f"{model} is already quantized; leave quantization unset")
        cfg, net, tokenizer = load_quantized_folder(model, device=device, dtype=dtype)
    else:
        from minfer.checkpoints import load_checkpoint
        from minfer.model import build_model
        cfg, state_dict, tokenizer = load_checkpoint(model, dtype=dtype, device="cpu")
        net = build_model(cfg, state_dict, device=device, dtype=dtype)
        del state_dict
        if quantization is not None:                              # weight-only: swap the linears
            quantize_model(net, quantization)
    _prepack(net, prepack, device, dtype)
    return LoadedModel(cfg, net, tokenizer)


def _prepack(net: nn.Module, prepack: bool | None, device: torch.device, dtype: torch.dtype) -> None:
    from minfer.devices import cpu_bf16_units
    from minfer.kernels import onednn_linear
    packable = device.type == "cpu" and (dtype == torch.float32 or dtype == torch.bfloat16 and cpu_bf16_units())
    if prepack:
        if not packable:
            raise ValueError("prepack is for one process on the CPU in float32, or bfloat16 with bf16 units "
                             f"(got device {device}, dtype {dtype})")
        onednn_linear.pack_linears(net)
    elif prepack is None and packable and onednn_linear.available():
        rows = None if dtype == torch.bfloat16 else onednn_linear.BATCHED_ROWS   # bf16: it wins at every row count
        onednn_linear.pack_linears(net, rows=rows)
    if prepack is None and device.type == "cpu" and dtype == torch.float32:   # batch 1: the fused C++ layer
        from minfer.kernels.cpu_fused_layer import prepare_fused_layers
        prepare_fused_layers(net)
