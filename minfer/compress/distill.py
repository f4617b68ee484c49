"""`minfer distill`: train a small Llama on the teacher cache (binned KL at T + CE, ``losses.py``) to serve
as a speculative draft (vLLM: ``SpeculativeConfig`` method "draft_model"); ``train`` also heals pruned models.
"""
import argparse
import dataclasses
import json
from pathlib import Path

import torch

from minfer.compress.common import fit
from minfer.compress.losses import distill_loss, student_bins, teacher_bins, binned_kl
from minfer.compress.teacher import TeacherCache
from minfer.config import ModelConfig
from minfer.model import build_model


def student_config(teacher_cfg: ModelConfig, *, layers: int = 2, hidden: int = 256, heads: int = 4,
                   kv_heads: int = 2, intermediate: int | None = None) -> ModelConfig:
    """A narrow, shallow Llama with the teacher's vocab, RoPE and special tokens."""
    return dataclasses.replace(
        teacher_cfg, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate or 3 * hidden,
        tie_word_embeddings=True, sliding_window=None, kv_share_group=1, extra={})


@torch.no_grad()
def init_student(teacher, cfg: ModelConfig, seed: int = 0):
    """Random student whose tied embedding is the teacher's, projected on its top ``hidden`` PCA directions."""
    student = build_model(cfg, seed=seed)
    E = teacher.model.embed_tokens.weight.float()                       # (V, H_teacher)
    E = E - E.mean(0, keepdim=True)
    _, _, V = torch.linalg.svd(E[::4], full_matrices=False)             # rows subsampled: cheaper, same axes
    proj = E @ V[:cfg.hidden_size].T                                    # (V, hidden)
    student.model.embed_tokens.weight.copy_(proj / proj.std() * 0.02 * 4)
    return student


def agreement(logits: torch.Tensor, topk_idx: torch.Tensor) -> float:
    """Fraction of positions where the student's argmax is the teacher's top-1 token."""
    return float((logits.argmax(-1) == topk_idx[..., 0]).float().mean())


@torch.no_grad()
def evaluate(model, cache: TeacherCache, max_seqs: int = 8) -> dict:
    """Held-out binned KL (T = 1), top-1 agreement and CE on the first ``max_seqs`` sequences."""
    b = cache.batch(range(min(max_seqs, len(cache))))
    B, T = b.tokens.shape
    pos = torch.arange(T)[None].expand(B, T)
    logits = model(b.tokens, pos).float()                               # (B, T, V)
    kl = binned_kl(teacher_bins(b.topk_logp), student_bins(logits, b.topk_idx), 1.0)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.tokens[:, 1:].reshape(-1))
    return {"heldout_kl": float(kl), "heldout_agreement": agreement(logits, b.topk_idx), "heldout_ce": float(ce)}


def train(student, train_cache: TeacherCache, heldout: TeacherCache | None = None, *, steps: int | None = None,
          minutes: float | None = None, batch: int = 4, lr: float = 2e-3, temperature: float = 2.0,
          alpha: float = 0.9, eval_every: int = 50, seed: int = 0, log=print, on_eval=None) -> list[dict]:
    """Train ``student`` in place on the cache (``common.fit``: at least one of steps and minutes) -> the
    curve, one dict per evaluation; ``on_eval(student, curve)`` is called after each evaluation."""
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (a budget for training)")
    if (steps is not None and steps < 1) or (minutes is not None and minutes <= 0):
        raise ValueError(f"steps must be >= 1 and minutes > 0; got {steps}, {minutes}")
    gen = torch.Generator().manual_seed(seed)
    T = train_cache.meta["seq_len"]

    def step_loss():
        b = train_cache.batch(torch.randint(len(train_cache), (batch,), generator=gen).tolist())
        logits = student(b.tokens, torch.arange(T)[None].expand(batch, T))                # (B, T, V)
        V, k = logits.shape[-1], b.topk_idx.shape[-1]
        return distill_loss(logits[:, :-1].reshape(-1, V), b.topk_idx[:, :-1].reshape(-1, k),
                            b.topk_logp[:, :-1].reshape(-1, k), b.tokens[:, 1:].reshape(-1),
                            temperature=temperature, alpha=alpha)

    def evaluation(step, seconds, train_loss):
        return {"step": step, "train_tokens": step * batch * T, "seconds": seconds, "train_loss": train_loss,
                **(evaluate(student, heldout) if heldout is not None else {})}
    return fit(student, step_loss, evaluation, steps=steps, minutes=minutes, lr=lr, eval_every=eval_every,
               log=log, on_eval=on_eval, clip=1.0, weight_decay=0.01, betas=(0.9, 0.95))


def save_student(model, path: str | Path, teacher_path: str | Path, curve: list[dict], extra: dict | None = None) -> Path:
    """An HF folder (config, safetensors, the teacher's tokenizer files, distill_log.json)."""
    from minfer.checkpoints.hf import save_hf_folder
    from minfer.checkpoints.loader import resolve_model

    src = resolve_model(teacher_path)
    tok_json = (src / "tokenizer.json").read_text() if (src / "tokenizer.json").is_file() else None
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else None
    state = {k: v.detach().float() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    log = json.dumps({"curve": curve, **(extra or {})}, indent=1)
    return save_hf_folder(path, model.cfg, state, tok_json, tok_cfg, extra_files={"distill_log.json": log})


# --- CLI ---
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args
    add_model_args(p)
    p.add_argument("--cache", default="weights/compress/teacher", help="teacher cache folder (train/ and heldout/)")
    p.add_argument("--out", default="weights/compress/draft", help="output HF folder")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=None, help="time budget (default: none; give this or --steps)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term (1 - alpha: CE)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    from minfer.cli_args import set_threads
    from minfer.compress.common import log
    from minfer.llm import LLM

    set_threads(args.threads)
    if args.minutes is None and args.steps is None:
        raise ValueError("give --minutes or --steps (a training budget)")
    teacher = LLM(args.model, device="cpu", dtype="float32", prepack=False).model
    train_cache = TeacherCache(Path(args.cache) / "train")
    heldout = TeacherCache(Path(args.cache) / "heldout")
    cfg = student_config(teacher.cfg, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads)
    student = init_student(teacher, cfg, seed=args.seed)
    log(f"student: {cfg.num_parameters() / 1e6:.1f}M parameters ({args.layers} layers, hidden {args.hidden}); "
        f"train cache {train_cache.num_tokens} tokens, held-out {heldout.num_tokens}")
    meta = {"cache": str(args.cache), "corpus": train_cache.meta.get("corpus"), "args": {
        k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))}}
    curve = train(student, train_cache, heldout, steps=args.steps, minutes=args.minutes, batch=args.batch,
                  lr=args.lr, temperature=args.temperature, alpha=args.alpha, eval_every=args.eval_every,
                  seed=args.seed, log=log,                 # saved after each evaluation, the last one too
                  on_eval=lambda m, c: save_student(m, args.out, args.model, c, meta))
    log(f"saved {args.out}: held-out agreement {curve[-1].get('heldout_agreement'):.3f}, "
        f"KL {curve[-1].get('heldout_kl'):.3f}")
    return 0
