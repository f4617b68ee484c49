"""The visibility rule shared by every attention backend: a query at position p sees a key at position j
iff 0 <= j <= p (and p - j < W). Drawn: docs/kv-and-attention.md.
"""
import torch


def allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean visibility (B, T, S) from query positions (B, T) and key positions (B, S)."""
    qp = q_pos[:, :, None]                        # (B, T, 1)
    kp = k_pos[:, None, :]                        # (B, 1, S)
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= (qp - kp) < window
    return ok
