"""Sliding-window perplexity on a fixed text (``pydoc_data.topics``, no download).

Windows of ``context`` tokens whose ends lie ``stride`` apart; each token is scored once, as in
HF transformers' "Perplexity of fixed-length models" guide (llama.cpp's ``llama-perplexity``
differs). The window diagram: docs/compression.md.
"""
import hashlib
import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DEFAULT_CHARS = 16_000          # ~4k SmolLM2 tokens: a 2-core CPU scores it in well under a minute
DEFAULT_CONTEXT = 512
DEFAULT_STRIDE = 256


def reference_text(chars: int = DEFAULT_CHARS) -> str:
    """The fixed evaluation text: the first ``chars`` characters of the sorted pydoc topics."""
    from pydoc_data.topics import topics

    if chars < 1:
        raise ValueError(f"chars must be positive, got {chars}")
    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def text_fingerprint(text: str) -> dict:
    """What identifies the text: Python version, length, sha256 prefix."""
    return {"source": "pydoc_data.topics (sorted keys, joined with blank lines)",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
            "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float                  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, token_ids: list[int], context: int = DEFAULT_CONTEXT,
               stride: int = DEFAULT_STRIDE, attention: str = "sdpa") -> PerplexityResult:
    """Perplexity of ``model`` (a minfer Transformer) on ``token_ids``, windowed as above."""
    if not 0 < stride < context:
        raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}], got {stride} "
                         f"(each window needs at least one token of context before what it scores)")
    if context > model.cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds the model's {model.cfg.max_position_embeddings} positions")
    n = len(token_ids)
    if n < 2:
        raise ValueError("need at least 2 tokens to score one")
    device = model.inv_freq.device
    ids = torch.tensor(token_ids, device=device)
    total, windows, done = 0.0, 0, 1          # tokens [1, done) are scored; token 0 has no context
    while done < n:
        end = min(n, context if windows == 0 else done + stride)
        begin = max(0, end - context)          # <= done - 1 because stride < context
        chunk = ids[begin:end][None]                                          # (1, T)
        pos = torch.arange(end - begin, device=device)[None]                  # (1, T)
        logits = model(chunk, pos, attention=attention)[0].float()            # (T, V)
        pred = logits[done - 1 - begin:end - 1 - begin]                       # (S, V): predicts done..end-1
        total += float(F.cross_entropy(pred, ids[done:end], reduction="sum"))
        windows += 1
        done = end
    nll = total / (n - 1)
    return PerplexityResult(math.exp(nll), nll, n - 1, windows, context, stride)
