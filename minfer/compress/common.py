"""Small helpers every compression command shares (no heavy imports)."""
from __future__ import annotations

import math
import sys

DEFAULT_CACHE = "weights/teacher-cache"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lr_at(progress: float, base: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to ``floor * base``."""
    if progress < warmup:
        return base * max(progress, 1e-3) / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
