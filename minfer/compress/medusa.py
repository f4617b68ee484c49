"""Training Medusa heads on the teacher cache (the base model stays frozen).

The heads, the static tree and the decoding loop are speculative decoding, in
``minfer/speculative/medusa.py``; this module only fits the heads: each head j reads the
base model's last hidden state h_t and learns the teacher's distribution of token t + 2 + j
(Cai et al. 2024, "Medusa", the MEDUSA-1 recipe: a frozen backbone). ``minfer medusa train |
selfdistill`` (``medusa_cli.py``) are the commands.
"""
from __future__ import annotations

import json
import time

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
    """AdamW on the heads only; returns the held-out curve (per-head top-1 accuracy vs the teacher)."""
    from minfer.compress.common import lr_at
    gen = torch.Generator().manual_seed(seed)
    heads.train().requires_grad_(True)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    curve, step, t0 = [], 0, time.perf_counter()

    def progress():
        parts = [(time.perf_counter() - t0) / (60 * minutes)] + ([step / steps] if steps else [])
        return max(parts)

    def evaluate():
        if heldout is None:
            return
        with torch.no_grad():
            _, accs = head_loss(model, heads, heldout.batch(range(min(eval_rows, len(heldout)))), positions=1024,
                                generator=torch.Generator().manual_seed(1))
        row = {"step": step, "seconds": round(time.perf_counter() - t0, 1), "head_top1": accs}
        curve.append(row)
        log(json.dumps(row))

    evaluate()
    while progress() < 1.0:
        b = train_cache.batch(torch.randint(len(train_cache), (batch,), generator=gen).tolist())
        loss, _ = head_loss(model, heads, b, positions, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(), lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every == 0:
            evaluate()
    if not curve or curve[-1]["step"] != step:
        evaluate()
    heads.eval().requires_grad_(False)
    return curve
