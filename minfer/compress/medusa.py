"""Training Medusa heads on the teacher cache, the base model frozen (Cai et al. 2024, MEDUSA-1), and
`minfer medusa train | selfdistill | cost`.

Head j reads the base model's last hidden state h_t and learns the teacher's distribution of token
t + 2 + j; the heads and their decoding loop: ``minfer/speculative/medusa.py``.
"""
import argparse
from pathlib import Path

import torch

from minfer.speculative.medusa import MedusaHeads


def head_loss(model, heads: MedusaHeads, batch, positions: int | None = None, generator=None):
    """Binned KL of each head vs the teacher j + 1 positions later -> (loss, top-1 acc per head): head j
    predicts token t + 2 + j; with a ``loss_mask`` only generated positions count (docs/compression.md)."""
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
    logits = model.compute_logits(heads(batch.hidden[b_i, t_i]))     # hidden (N, h) -> (N, K, V)
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


# --- `minfer medusa train | selfdistill | cost` ---
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args
    sub = p.add_subparsers(dest="medusa_cmd", required=True)
    t = sub.add_parser("train", help="train K Medusa heads on the teacher cache's hidden states")
    add_model_args(t)
    t.add_argument("--cache", default="weights/compress/teacher")
    t.add_argument("--out", default="weights/compress/medusa")
    _add_train_arguments(t)
    t.add_argument("--minutes", type=float, default=5.0)

    s = sub.add_parser("selfdistill", help="train K Medusa heads on the model's own greedy answers "
                                           "(prompts from the corpus's training split)")
    add_model_args(s)
    s.add_argument("--out", default="weights/compress/medusa-self", help="heads folder")
    s.add_argument("--data", default="weights/compress/selfdistill",
                   help="answers and teacher caches (reused / resumed if there)")
    s.add_argument("--minutes", type=float, default=None,
                   help="total budget: 45%% generating, 55%% training (the teacher pass is extra)")
    s.add_argument("--minutes-generate", type=float, default=None)
    s.add_argument("--minutes-train", type=float, default=None)
    s.add_argument("--max-examples", type=int, default=2000, help="training prompts at most (default 2000)")
    s.add_argument("--heldout-examples", type=int, default=16, help="held-out-split prompts (evaluation)")
    s.add_argument("--max-tokens", type=int, default=128, help="answer length at most (default 128)")
    s.add_argument("--gen-batch", type=int, default=8, help="prompts per LLM.generate call")
    s.add_argument("--seq-len", type=int, default=384, help="teacher-cache row: one example, padded")
    s.add_argument("--prepack", action="store_true", help="generate on oneDNN-prepacked linears")
    s.add_argument("--seed", type=int, default=0)
    _add_train_arguments(s)

    c = sub.add_parser("cost", help="time one verify forward of T tokens against one plain decode step")
    add_model_args(c)
    c.add_argument("--heads-dir", required=True, help="a Medusa heads folder")
    c.add_argument("--sizes", default="1,4,7", help="forward sizes T = 1 + tree nodes (default 1,4,7)")
    c.add_argument("--repeats", type=int, default=30)
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(module="minfer.bench.medusa_cost")    # a benchmark: minfer.cli runs that module's main


def _add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--heads", type=int, default=3)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch", type=int, default=4, help="sequences drawn per step")
    t.add_argument("--positions", type=int, default=64, help="positions per step (the LM head is the cost)")
    t.add_argument("--eval-every", type=int, default=25)
    t.add_argument("--threads", type=int, default=1)


def main(args) -> int:
    from minfer.cli_args import set_threads
    set_threads(args.threads)
    if args.medusa_cmd == "selfdistill":
        return _main_selfdistill(args)
    from minfer.compress.teacher import TeacherCache
    from minfer.loading import load_model
    model = load_model(args.model, device="cpu", dtype=torch.float32).model
    train_cache, heldout = TeacherCache(Path(args.cache) / "train"), TeacherCache(Path(args.cache) / "heldout")
    return _train_and_save(args, model, train_cache, heldout, args.minutes, {"cache": str(args.cache)})


def _train_and_save(args, model, train_cache, heldout, minutes, extra: dict, **kw) -> int:
    """Train ``args.heads`` heads on the caches, save them to ``args.out`` with their curve and ``extra``."""
    from minfer.compress.common import log
    heads = MedusaHeads(model.cfg.hidden_size, args.heads)
    curve = train_heads(model, heads, train_cache, heldout, minutes=minutes, steps=args.steps, lr=args.lr,
                        batch=args.batch, positions=args.positions, eval_every=args.eval_every, log=log, **kw)
    heads.save(args.out, {"curve": curve, **extra, "model": str(args.model)})
    log(f"saved {args.out}: held-out top-1 per head {[round(a, 3) for a in curve[-1]['head_top1']]}")
    return 0


def _main_selfdistill(args) -> int:
    """`minfer medusa selfdistill`: answers -> teacher caches -> heads (minfer/compress/selfdistill.py)."""
    from minfer.compress.selfdistill import selfdistill
    from minfer.compress.teacher import TeacherCache
    from minfer.llm import LLM
    gen_m, train_m = args.minutes_generate, args.minutes_train
    if args.minutes is not None:
        gen_m = 0.45 * args.minutes if gen_m is None else gen_m
        train_m = 0.55 * args.minutes if train_m is None else train_m
    if gen_m is None or (train_m is None and args.steps is None):
        raise ValueError("give --minutes, or --minutes-generate and --minutes-train (or --steps)")
    if gen_m < 0 or (train_m is not None and train_m <= 0):
        raise ValueError(f"the minutes must be positive, got generate {gen_m}, train {train_m}")
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=args.prepack)
    caches = selfdistill(llm, args.data, minutes_generate=gen_m, max_examples=args.max_examples,
                         heldout_examples=args.heldout_examples, max_tokens=args.max_tokens, batch=args.gen_batch,
                         seq_len=args.seq_len, seed=args.seed)
    train_cache, heldout = TeacherCache(caches["train"]), TeacherCache(caches["heldout"])
    extra = {"data": str(args.data), "selfdistill": True, "train_rows": len(train_cache),
             "heldout_rows": len(heldout)}
    minutes = train_m if train_m is not None else 1e9
    return _train_and_save(args, llm.model, train_cache, heldout, minutes, extra, eval_rows=len(heldout))
