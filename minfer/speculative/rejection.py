"""The accept/reject rule of speculative sampling (Leviathan, Kalman & Matias 2023; Chen et al. 2023):

    accept x ~ q with probability min(1, p(x) / q(x)), else sample norm(max(0, p - q))

samples exactly from the target p (docs/speculative.md); a deterministic proposal is q = one-hot,
greedy is p = one-hot(argmax). vLLM: ``vllm/v1/sample/rejection_sampler.py``.
"""
import torch

from minfer.sampling import SamplingParams, top_k_filter, top_p_filter


# --- Distributions ---
def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``minfer.sampling.sample`` draws from: logits (..., V) -> probs (..., V), fp32
    (greedy: the one-hot of the argmax)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    x = logits.float() / params.temperature
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return torch.softmax(x, dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; p where p == q (a rejection has probability 0 there)."""
    r = (p - q).clamp(min=0)                                          # (..., V)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def accept_reject(p: torch.Tensor, q: torch.Tensor, x: int) -> tuple[float, torch.Tensor]:
    """The rule for ONE position: (min(1, p(x) / q(x)), norm(max(0, p - q))), the probability of accepting
    draft token x and the residual. p, q (V,): target and draft distributions; x was drawn from q."""
    px, qx = float(p[x]), float(q[x])
    accept = 1.0 if px >= qx else px / qx
    return accept, residual_distribution(p, q)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from probs (V,) by the exponential race, as ``minfer.sampling.sample`` draws."""
    probs = probs.float().cpu()
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)   # E_i ~ Exp(1)
    return int(torch.argmax(probs / race))


# --- One verification step over gamma proposed tokens ---
def verify_greedy(target_argmax: list[int], draft_tokens: list[int]) -> list[int]:
    """Greedy verification -> the n accepted draft tokens + the target's own argmax after them (a
    correction, or the bonus token). target_argmax (gamma + 1,): the target's argmax after each prefix."""
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == target_argmax[n]:
        n += 1
    return list(draft_tokens[:n]) + [int(target_argmax[n])]


def verify_sampled(p: torch.Tensor, q: torch.Tensor | None, draft_tokens: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """One step -> the accepted prefix of draft_tokens, then one token from the residual at the first
    rejection (all accepted: from p[gamma]). p (gamma + 1, V): target distributions, row i after
    draft_tokens[:i]; q (gamma, V): the draft's, or None for a deterministic proposal (one-hot q)."""
    gamma = len(draft_tokens)
    if p.shape[0] != gamma + 1 or (q is not None and q.shape[0] != gamma):
        raise ValueError(f"need p with gamma + 1 = {gamma + 1} rows and q with gamma rows; got "
                         f"{tuple(p.shape)} and {None if q is None else tuple(q.shape)}")
    p = p.float().cpu()
    out: list[int] = []
    for i, x in enumerate(draft_tokens):
        qi = torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).float() if q is None else q[i].float().cpu()
        accept, residual = accept_reject(p[i], qi, x)
        if float(torch.rand((), generator=generator)) >= accept:         # u ~ U[0, 1): rejected
            return out + [sample_from(residual, generator)]               # correct, and stop
        out.append(int(x))
    return out + [sample_from(p[gamma], generator)]                       # all accepted: the bonus token
