"""Interleaved timing: run every method once per round, report medians and ratios."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable


def interleaved(methods: dict[str, Callable[[], dict]], repeats: int, warmup: int = 1,
                log: Callable[[str], None] = print) -> dict[str, dict]:
    """Call each method `warmup` times, then `repeats` rounds of A, B, C, ...

    Each call returns a dict of numbers; the result maps method -> median of each number.
    """
    for name, fn in methods.items():
        for _ in range(warmup):
            log(f"  warm-up {name} ...")
            fn()
    samples: dict[str, list[dict]] = {name: [] for name in methods}
    for r in range(repeats):
        for name, fn in methods.items():
            res = fn()
            samples[name].append(res)
            log(f"  round {r + 1}/{repeats} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
    return {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}


def write_json(path: str | Path, payload: dict) -> None:
    """Atomic JSON write (``minfer.atomic``)."""
    from minfer import atomic
    atomic.write_json(path, payload)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format)."""
    head = " | ".join(h for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join((fmt.format(r[k]) if r.get(k) is not None else "n/a").rjust(len(h))
                                for k, h, fmt in columns))
    return "\n".join(lines)
