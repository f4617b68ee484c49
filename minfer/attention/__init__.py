"""How attention is computed, given q, the visible keys/values, and positions.

Every backend: ``backend(q, k, v, q_pos, k_pos, window=None, scale=None) -> out``, with q
(B, nh, T, hd), k/v (B, nkv, S, hd), positions (B, T) / (B, S) (-1: an empty slot). Who sees
whom follows from positions alone (``mask.allowed``). Backends: reference, sdpa, flash; the
paged backends are ``attention/paged.py``. Details: docs/kv-and-attention.md.
"""
from typing import Protocol

import torch

from minfer.attention.flash import flash_attention
from minfer.attention.mask import allowed
from minfer.attention.reference import reference_attention
from minfer.attention.sdpa import sdpa_attention


class AttentionBackend(Protocol):
    """The signature every backend shares (see the module docstring for the shapes)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, window: int | None = None, scale: float | None = None) -> torch.Tensor: ...


BACKENDS: dict[str, AttentionBackend] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}


def get_backend(name: str) -> AttentionBackend:
    """Look up an attention backend by name."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}") from None


__all__ = ["AttentionBackend", "BACKENDS", "get_backend", "allowed", "reference_attention", "sdpa_attention",
           "flash_attention"]
