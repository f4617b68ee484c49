"""Draft-model speculative decoding (Leviathan et al. 2023): a small model guesses, the target verifies.

Drafts: another checkpoint, the target in int4 (``quantized_draft``) or its first k layers (LayerSkip);
both caches roll back with ``truncate``. vLLM: ``SpeculativeConfig`` method "draft_model".
"""
import dataclasses
from os.path import commonprefix

import torch
from torch import nn

from minfer.sampling import SamplingParams, sample
from minfer.generate import forward_tokens
from minfer.speculative.loop import new_cache
from minfer.speculative.rejection import processed_probs


class DraftModelProposer:
    """Proposes gamma tokens by running a draft model autoregressively with its own KV cache."""

    def __init__(self, draft, *, kv_cache: str = "contiguous", attention: str = "sdpa",
                 vocab_size: int | None = None):
        self.draft, self.attention, self.kv_cache = draft, attention, kv_cache
        if vocab_size is not None and draft.cfg.vocab_size != vocab_size:
            raise ValueError(f"the draft's vocab_size ({draft.cfg.vocab_size}) differs from the target's "
                             f"({vocab_size}): a draft must share the target's tokenizer")
        self.cache = None
        self.tokens: list[int] = []       # the tokens whose K/V the draft cache holds, in order

    def begin(self, prompt_ids: list[int], max_len: int) -> None:
        """A new request of at most ``max_len`` tokens: a fresh, empty draft cache."""
        self.cache, self.tokens = new_cache(self.draft, self.kv_cache, max_len), []

    def propose(self, seq: list[int], k: int, params: SamplingParams,
                generator) -> tuple[list[int], torch.Tensor | None]:
        keep = min(len(commonprefix([self.tokens, seq])), len(seq) - 1)     # at least one token to feed
        self.cache.truncate(keep)
        feed, start = seq[keep:], keep    # catch up: the tokens the draft has not seen yet (>= 1)
        self.tokens = list(seq[:keep])
        drafts, qs = [], []
        for i in range(k):
            logits = forward_tokens(self.draft, self.cache, feed, start, self.attention, last_only=True)[-1]
            self.tokens += feed
            start += len(feed)
            if params.greedy:
                tok = int(logits.argmax())
            else:
                qs.append(processed_probs(logits, params))            # (V,)
                tok = sample(logits, params, generator)
            drafts.append(tok)
            feed = [tok]
        return drafts, (torch.stack(qs) if qs else None)

    def accepted(self, seq: list[int]) -> None:
        keep = len(commonprefix([self.tokens, seq]))
        self.cache.truncate(keep)         # forget the K/V of rejected guesses
        self.tokens = self.tokens[:keep]


# --- Drafts made from the target itself ---
def layer_skip_draft(target, num_layers: int):
    """The target's first ``num_layers`` layers + final norm + LM head, sharing the target's weights: a
    ``Transformer`` whose cfg says ``num_hidden_layers = num_layers`` (its KV cache has only those layers)."""
    from minfer.model import Transformer

    L = target.cfg.num_hidden_layers
    if not 1 <= num_layers <= L:
        raise ValueError(f"layer-skip draft: num_layers must lie in [1, {L}], got {num_layers}")
    cfg = dataclasses.replace(target.cfg, num_hidden_layers=num_layers)
    with torch.device("meta"):
        draft = Transformer(cfg)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(list(target.model.layers[:num_layers]))
    draft.model.norm = target.model.norm
    if getattr(target, "lm_head", None) is not None:
        draft.lm_head = target.lm_head
    draft.inv_freq = target.inv_freq
    return draft.eval()


def quantized_draft(target, fmt: str = "int4"):
    """A copy of the target, weight-only quantized by ``quantize_model`` (self-speculation; the LM head
    gets int8, its default): same tokenizer, ~1/8 the bytes for int4."""
    import copy

    from minfer.quant.apply import quantize_model
    return quantize_model(copy.deepcopy(target), fmt)
