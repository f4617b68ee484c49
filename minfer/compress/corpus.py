"""The corpus every student here trains on, and the text it is judged on: the standard library's ``.py``
sources, 1 in ``HELD_OUT_EVERY`` held out by a stable hash of the path (``pydoc_data.topics``: never).
"""
import hashlib
import sysconfig
from pathlib import Path

HELD_OUT_EVERY = 20
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path, skipping tests and vendored code."""
    files = [p for p in STDLIB.rglob("*.py") if not (set(p.relative_to(STDLIB).parts[:-1]) & SKIP_PARTS)]
    return sorted(files, key=lambda p: p.relative_to(STDLIB).as_posix())


def is_held_out(relpath: str) -> bool:
    """Stable split: sha256 of the relative path, one bucket in HELD_OUT_EVERY."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


def split_files(split: str) -> list[Path]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [p for p in stdlib_files() if is_held_out(p.relative_to(STDLIB).as_posix()) == want]


def token_stream(tokenizer, split: str, max_tokens: int, eos: int | None = None) -> list[int]:
    """Concatenate the split's files (each followed by ``eos``) until ``max_tokens`` tokens."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    out: list[int] = []
    for path in split_files(split):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out += tokenizer.encode(text) + ([eos] if eos is not None else [])
        if len(out) >= max_tokens:
            break
    return out[:max_tokens]


def split_fingerprint() -> dict:
    """What identifies the split: counts and a hash of the held-out file list."""
    import sys
    held = [p.relative_to(STDLIB).as_posix() for p in split_files("heldout")]
    return {"train": "stdlib .py sources (sorted), held-out bucket excluded",
            "heldout": f"stdlib .py files with sha256(relpath) % {HELD_OUT_EVERY} == 0",
            "never_trained": "pydoc_data.topics",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
            "heldout_files": len(held), "train_files": len(split_files("train")),
            "heldout_sha256": hashlib.sha256("\n".join(held).encode()).hexdigest()[:16]}
