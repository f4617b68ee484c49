"""One entry point for weights: a registry name (fetched on first use), an HF folder, or a .gguf file
(converted in memory). HF: ``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer``; vLLM:
``model_executor/model_loader/`` (``DefaultModelLoader``, ``GGUFModelLoader``).
"""
import os
from pathlib import Path
from typing import Any

import torch

from minfer.checkpoints.fetch import fetch
from minfer.checkpoints.gguf_import import read_gguf
from minfer.checkpoints.hf import load_hf_folder
from minfer.checkpoints.registry import REGISTRY, get_entry, is_fetched, model_dir
from minfer.config import ModelConfig
from minfer.tokenizer import Tokenizer


def resolve_model(name_or_path: str | os.PathLike, fetch_if_missing: bool = True) -> Path:
    """Turn a registry name or a path into the folder / .gguf file to load."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'}: not found "
                                    "(an HF model folder needs config.json and *.safetensors)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected an HF model folder or a .gguf file")
        return path
    name = str(name_or_path)
    if name not in REGISTRY and (os.sep in name or "/" in name or name.endswith(".gguf")):
        raise FileNotFoundError(f"{path}: no such file or folder")
    get_entry(name)             # unknown name: ValueError listing the known names
    if is_fetched(name):
        return model_dir(name)
    if not fetch_if_missing:
        raise FileNotFoundError(f"model {name!r} is not fetched yet; run "
                                f"`minfer weights fetch {name}` or minfer.checkpoints.fetch({name!r})")
    return fetch(name)


def load_checkpoint(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu",
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """-> (config, state dict with HF names, tokenizer)."""
    path = resolve_model(name_or_path)
    if path.suffix == ".gguf":
        config, state_dict, tok_json, tok_config = read_gguf(path, dtype=dtype)
        if tok_json is None:
            raise ValueError(f"{path}: has no tokenizer metadata (tokenizer.ggml.*)")
        state_dict = {k: v.to(device) for k, v in state_dict.items()}
        tokenizer = Tokenizer.from_json(tok_json, tok_config, config.eos_token_ids(), source=str(path))
        return config, state_dict, tokenizer
    config, state_dict = load_hf_folder(path, dtype=dtype, device=device)
    return config, state_dict, Tokenizer.from_folder(path)


def list_models() -> list[dict[str, Any]]:
    """Registry models: name, description, license, fetched (bool), path (str)."""
    return [{"name": e.name, "description": e.description, "license": e.license,
             "fetched": is_fetched(e.name), "path": str(model_dir(e.name))}
            for e in REGISTRY.values()]
