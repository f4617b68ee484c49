"""The accept/reject rule of speculative sampling, and its greedy special case.

Convention (kept from Leviathan, Kalman & Matias 2023, "Fast Inference from
Transformers via Speculative Decoding", and Chen et al. 2023, "Accelerating
Large Language Model Decoding with Speculative Sampling"):

    p(x)   the TARGET model's distribution for the next token (what we must sample from)
    q(x)   the DRAFT's distribution that the guess x was drawn from
    gamma  how many tokens the draft guesses per step

One position, draft token x ~ q:

    accept x               with probability  min(1, p(x) / q(x))
    otherwise sample from  p'(.) = norm(max(0, p(.) - q(.)))          (the "residual")

Why the output is distributed exactly as p (write m(y) = min(p(y), q(y))):

    P(out = y) = q(y) * min(1, p(y)/q(y)) + P(reject) * p'(y)
               = m(y) + (1 - sum_z m(z)) * max(0, p(y) - q(y)) / sum_z max(0, p(z) - q(z))
               = m(y) + max(0, p(y) - q(y))     because 1 - sum_z m(z) = sum_z max(0, p(z) - q(z))
               = p(y)

A step over gamma draft tokens applies this rule position by position and
stops at the first rejection (whose residual sample is the step's last
token). When all gamma are accepted, the target's distribution at position
gamma + 1 was computed anyway, so one more "bonus" token is sampled from it:
every step emits between 1 and gamma + 1 tokens.

A *deterministic* proposal (prompt lookup, lookahead, a greedy draft) is the
case q = one-hot(x): accept with probability p(x), else sample from p with x
removed. Greedy decoding is the case p = one-hot(argmax): accept while the
draft equals the target's argmax, then emit the target's argmax.

"p" here is the *processed* distribution: temperature, top-k and top-p are
applied to both models' logits first (``processed_probs``), so speculative
sampling reproduces exactly what ``minfer.sampling.sample`` would sample from.

vLLM's equivalent: ``vllm/v1/sample/rejection_sampler.py`` (``RejectionSampler``:
``draft_probs`` = q, ``target_probs`` = p, "recovered" tokens = residual samples).
"""
from __future__ import annotations

import torch

from minfer.sampling import SamplingParams, top_k_filter, top_p_filter

# ---------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``minfer.sampling.sample`` draws from: logits (..., V) -> probs (..., V), fp32.

    Greedy (temperature 0) gives the one-hot of the argmax.
    """
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    x = logits.float() / params.temperature
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return torch.softmax(x, dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim. Where p == q (nothing to correct, and a
    rejection has probability 0) it returns p, so the result is always a distribution."""
    r = (p - q).clamp(min=0)                                          # (..., V)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def accept_reject(p: torch.Tensor, q: torch.Tensor, x: int) -> tuple[float, torch.Tensor]:
    """The rule for ONE position: (probability of accepting draft token x, residual distribution).

    p, q (V,): target and draft distributions; x: the draft's token (drawn from q, so q(x) > 0).
    Returns min(1, p(x) / q(x)) and norm(max(0, p - q)).
    """
    px, qx = float(p[x]), float(q[x])
    accept = 1.0 if px >= qx else px / qx
    return accept, residual_distribution(p, q)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from probs (V,) by the exponential race, as ``minfer.sampling.sample`` draws."""
    probs = probs.float().cpu()
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)   # E_i ~ Exp(1)
    return int(torch.argmax(probs / race))


# ---------------------------------------------------------------------------
# One verification step over gamma proposed tokens
# ---------------------------------------------------------------------------


def verify_greedy(target_argmax: list[int], draft_tokens: list[int]) -> list[int]:
    """Greedy verification. target_argmax (gamma + 1,): the target's argmax after each prefix.

    Accept draft tokens while they equal the target's argmax; then emit the
    target's own argmax (a correction, or the bonus token when all matched).
    Returns the emitted tokens: the n accepted draft tokens + 1.
    """
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == target_argmax[n]:
        n += 1
    return list(draft_tokens[:n]) + [int(target_argmax[n])]


def verify_sampled(p: torch.Tensor, q: torch.Tensor | None, draft_tokens: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """Speculative sampling verification of one step.

    p (gamma + 1, V): target distributions, row i for the token after draft_tokens[:i].
    q (gamma, V) or None: the draft distributions each draft token was drawn from;
      None = a deterministic proposal (q is the one-hot of the proposed token).
    Returns the emitted tokens: the accepted prefix of draft_tokens, then one token
    sampled from the residual at the first rejection or, if all were accepted, from p[gamma].
    """
    gamma = len(draft_tokens)
    if p.shape[0] != gamma + 1 or (q is not None and q.shape[0] != gamma):
        raise ValueError(f"need p with gamma + 1 = {gamma + 1} rows and q with gamma rows; got "
                         f"{tuple(p.shape)} and {None if q is None else tuple(q.shape)}")
    p = p.float().cpu()
    out: list[int] = []
    for i, x in enumerate(draft_tokens):
        qi = torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).float() if q is None else q[i].float().cpu()
        accept, residual = accept_reject(p[i], qi, x)
        u = float(torch.rand((), generator=generator))                   # u ~ U[0, 1)
        if u < accept:
            out.append(int(x))
            continue
        out.append(sample_from(residual, generator))                      # first rejection: correct and stop
        return out
    out.append(sample_from(p[gamma], generator))                          # all accepted: the bonus token
    return out
