"""Training Medusa heads on the teacher cache, the base model frozen (Cai et al. 2024, MEDUSA-1).

Head j reads the base model's last hidden state h_t and learns the teacher's distribution of token
t + 2 + j; the heads and their decoding loop: ``minfer/speculative/medusa.py``.
"""
from __future__ import annotations

import torch

from minfer.speculative.medusa import MedusaHeads


def head_loss(model, heads: MedusaHeads, batch, positions: int | None = None, generator=None):
    """Binned KL of each head vs the teacher's distribution j + 1 positions later; -> (loss, top-1 acc per head).

    Head j predicts token t + 2 + j (teacher at t + 1 + j); with a ``loss_mask`` only generated
    positions count (docs/compression.md).
    """
    from minfer.compress.losses import binned_kl, student_bins, teacher_bins
    B, T, h = batch.hidden.shape
    K = heads.num_heads
    n_t = T - 1 - K                                                   # t with all K targets inside the sequence
    mask = batch.loss_mask                                            # (B, T) bool or None
    if mask is None:
        flat = torch.arange(B * n_t)
    else:
        flat = mask[:, 1:1 + n_t].reshape(-1).nonzero().squeeze(1)    # (b, t) with token t + 1 generated
        if len(flat) == 0:
            raise ValueError("the batch's loss_mask selects no position with all K targets inside the sequence")
    if positions is not None and positions < len(flat):
        flat = flat[torch.randperm(len(flat), generator=generator)[:positions]]
    b_i, t_i = flat // n_t, flat % n_t
    hid = batch.hidden[b_i, t_i]                                      # (N, h)
    logits = model.compute_logits(heads(hid))                         # (N, K, V)
    losses, accs = [], []
    for j in range(K):
        idx, logp = batch.topk_idx[b_i, t_i + 1 + j], batch.topk_logp[b_i, t_i + 1 + j]   # (N, k)
        lj = logits[:, j]                                                                  # (N, V)
        if mask is not None:                                          # rows whose target is in the answer
            keep = mask[b_i, t_i + 1 + j]
            idx, logp, lj = idx[keep], logp[keep], lj[keep]
            if len(idx) == 0:
                losses.append(lj.sum() * 0.0)
                accs.append(float("nan"))
                continue
        losses.append(binned_kl(teacher_bins(logp), student_bins(lj, idx), 1.0))
        accs.append(float((lj.argmax(-1) == idx[:, 0]).float().mean()))
    return torch.stack(losses).sum(), accs


def train_heads(model, heads: MedusaHeads, train_cache, heldout=None, *, minutes: float = 5.0,
                steps: int | None = None, batch: int = 4, positions: int = 256, lr: float = 1e-3,
                eval_every: int = 50, seed: int = 0, eval_rows: int = 8, log=print) -> list[dict]:
    """AdamW on the heads only (``common.fit``) -> the held-out curve (per-head top-1 accuracy)."""
    from minfer.compress.common import fit
    gen = torch.Generator().manual_seed(seed)

    def step_loss():
        b = train_cache.batch(torch.randint(len(train_cache), (batch,), generator=gen).tolist())
        return head_loss(model, heads, b, positions, gen)[0]

    def evaluate(step, seconds, _train_loss):
        if heldout is None:
            return None
        with torch.no_grad():
            _, accs = head_loss(model, heads, heldout.batch(range(min(eval_rows, len(heldout)))), positions=1024,
                                generator=torch.Generator().manual_seed(1))
        return {"step": step, "seconds": seconds, "head_top1": accs}
    return fit(heads, step_loss, evaluate, steps=steps, minutes=minutes, lr=lr, eval_every=eval_every,
               log=log, weight_decay=0.0)
