"""The visibility rule shared by every attention backend.

    query at position p sees key at position j  iff  0 <= j <= p  (and p - j < W)

Drawn for a prompt of 5 tokens and a window W = 3 (x = visible):

            keys j:  0 1 2 3 4
    query p=0        x . . . .
    query p=1        x x . . .
    query p=2        x x x . .
    query p=3        . x x x .
    query p=4        . . x x x
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
