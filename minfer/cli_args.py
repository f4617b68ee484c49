"""Command-line options that every command loading a model shares (``minfer generate``, ``bench *``,
``batch``): which model, on which device, in which dtype."""
from __future__ import annotations

import argparse

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry name, HF folder or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
