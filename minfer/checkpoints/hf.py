"""HF-format model folders: config.json + *.safetensors (+ tokenizer files). minfer's state dict uses HF
Llama names and ``nn.Linear`` layout, so folders load here and in ``transformers`` alike.
"""
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minfer import atomic
from minfer.atomic import atomic_dir
from minfer.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


# --- Naming ---
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint for ``config`` must have, with its shape."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (out, h)
            if config.attention_bias:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (out,)
            if config.qk_norm and proj != "v":
                shapes[p + f"self_attn.{proj}_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        sandwich = ["pre_feedforward", "post_feedforward"] if config.sandwich_norm else []   # Gemma's
        for norm in ["input", "post_attention", *sandwich]:
            shapes[p + f"{norm}_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ValueError naming ``source`` and the first tensor missing, unexpected or of the wrong shape
    (``shapes``: name -> shape)."""
    want = expected_shapes(config)
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:3]} ({len(missing)} in all)")
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:3]} ({len(extra)} in all)")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, the config needs {shape}")


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``check_shapes`` for a state dict."""
    check_shapes(config, {k: tuple(v.shape) for k, v in state_dict.items()}, source)


# --- Loading ---
def read_config(folder: str | os.PathLike) -> ModelConfig:
    """``config.json`` -> ModelConfig; errors name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (an HF model folder needs config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, a 5,000-digit integer, 100k-deep nesting
        raise ValueError(f"{path}: not valid JSON ({e})"[:300]) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        return ModelConfig.from_hf(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the ones the sharding index names, else every *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid sharding index ({e!r})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder / 'model.safetensors'}: not found "
                                    f"(no *.safetensors files in {folder})")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (listed in {index.name})")
    return files


def load_hf_folder(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama-family folder -> (ModelConfig, state dict in HF names), floating tensors in ``dtype``.
    A tied checkpoint's ``lm_head.weight`` and old ``rotary_emb.inv_freq`` buffers are dropped."""
    folder = Path(path)
    config = read_config(folder)
    files = _safetensors_files(folder)

    def skip(name: str) -> bool:                # old rotary buffers; a tied checkpoint's copy of the LM head
        return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")

    def read(load: bool) -> dict:
        out: dict = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device=str(device)) as f:
                    for name in f.keys():
                        if not skip(name):
                            out[name] = f.get_tensor(name) if load else tuple(f.get_slice(name).get_shape())
            except Exception as e:              # safetensors raises its own SafetensorError
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        return out

    check_shapes(config, read(load=False), str(folder))      # names and shapes first, from the headers
    return config, {name: t.to(dtype) if t.is_floating_point() else t for name, t in read(load=True).items()}


# --- Saving ---
def save_hf_folder(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   tokenizer_json: str | None = None, tokenizer_config: dict[str, Any] | None = None,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write (or replace) an HF folder atomically -> the folder: config.json, model.safetensors, the
    tokenizer files if given, and ``extra_files`` (name -> text, e.g. a provenance note)."""
    target = Path(path)
    check_state_dict(config, state_dict, "save_hf_folder")
    with atomic_dir(target) as tmp:
        atomic.write_json(tmp / "config.json", config.to_hf())
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_json is not None:
            atomic.write_text(tmp / "tokenizer.json", tokenizer_json)
        if tokenizer_config is not None:
            atomic.write_json(tmp / "tokenizer_config.json", tokenizer_config)
        for name, text in (extra_files or {}).items():
            atomic.write_text(tmp / name, text)
    return target
