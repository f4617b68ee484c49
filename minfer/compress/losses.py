"""The distillation loss (Hinton, Vinyals & Dean 2015) on a teacher kept as its top-k log-probs:

    loss = alpha * T^2 * KL(q_teacher^T || q_student^T) + (1 - alpha) * CE(student, next token)

both distributions folded onto the teacher's k ids plus a "rest" bin (docs/compression.md).
"""
import torch
import torch.nn.functional as F

REST_FLOOR = 1e-6     # the rest bin never goes below this probability (top-k may cover ~all mass)


def teacher_bins(topk_logp: torch.Tensor) -> torch.Tensor:
    """(..., k) teacher log-probs -> (..., k + 1) log-probs of the bins (the last is "rest")."""
    lp = topk_logp.double()                           # 1 - mass cancels: float64 keeps the rest bin exact
    rest = torch.log((1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(REST_FLOOR))
    return torch.cat([lp, rest], dim=-1)


def student_bins(logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """(..., V) student logits and (..., k) teacher ids -> (..., k + 1) student log-probs of the bins."""
    logp = torch.log_softmax(logits.float(), dim=-1)                    # (..., V)
    top = logp.gather(-1, topk_idx)                                     # (..., k)
    rest = logp.scatter(-1, topk_idx, float("-inf")).logsumexp(-1, keepdim=True)   # (..., 1)
    return torch.cat([top, rest], dim=-1)


def binned_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)); inputs are bin log-probs."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = torch.log_softmax(teacher.double() / temperature, dim=-1)       # (..., k + 1): small, so float64
    s = torch.log_softmax(student.double() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)                                     # (...,)
    return (kl.mean() * temperature ** 2).to(student.dtype)


def distill_loss(logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor,
                 targets: torch.Tensor | None = None, *, temperature: float = 2.0,
                 alpha: float = 0.9) -> torch.Tensor:
    """alpha * T^2 * KL(teacher^T || student^T) + (1 - alpha) * CE(logits, targets). logits (N, V),
    topk_idx (N, k), topk_logp (N, k), targets (N,) or None (then alpha = 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    kl = binned_kl(teacher_bins(topk_logp.float()), student_bins(logits, topk_idx), temperature)
    if targets is None or alpha == 1.0:
        return kl
    return alpha * kl + (1 - alpha) * F.cross_entropy(logits.float(), targets)


def topk_distill_kl(logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """The KL term alone: T^2 * KL over the k + 1 bins (lesson 10's exercise)."""
    return binned_kl(teacher_bins(topk_logp.float()), student_bins(logits, topk_idx), temperature)
