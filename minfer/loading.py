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
    prepack       True: every fp32 CPU linear through oneDNN (``minfer/kernels/onednn_linear.py``); None:
                  the batched row counts only, where it applies (CPU, float32); False: plain ``nn.Linear``"""
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
    from minfer.kernels import onednn_linear
    plain_cpu = device.type == "cpu" and dtype == torch.float32
    if prepack:
        if not plain_cpu:
            raise ValueError(f"prepack is for one process on the CPU in float32 (got device {device}, dtype {dtype})")
        onednn_linear.pack_linears(net)
    elif prepack is None and plain_cpu and onednn_linear.available():
        onednn_linear.pack_linears(net, rows=onednn_linear.BATCHED_ROWS)     # batched steps only
