"""Prompt lookup decoding (Saxena 2023; Yang et al. 2023): the draft is the text itself, what followed an
earlier occurrence of the last n tokens. vLLM: ``vllm/v1/spec_decode/ngram_proposer.py``.
"""
from os.path import commonprefix

import torch

from minfer.sampling import SamplingParams


def ngram_propose(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the longest suffix n-gram of
    ``tokens`` (prompt + generated), min_n <= n <= max_n; [] if none."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n:]
        for i in range(L - n):                     # start i, match ends at i + n <= L - 1: a token follows
            if tokens[i:i + n] == suffix:
                return list(tokens[i + n:i + n + k])
    return []


class PromptLookupProposer:
    """``ngram_propose`` as a proposer. ``adaptive``: the length cap doubles after a fully accepted proposal
    and drops to accepted + 1 after a rejection (the guesses stay a function of the text)."""

    def __init__(self, prompt_lookup_min: int = 2, prompt_lookup_max: int = 4, adaptive: bool = True):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"prompt_lookup_min={prompt_lookup_min}, prompt_lookup_max={prompt_lookup_max}")
        self.min_n, self.max_n, self.adaptive = prompt_lookup_min, prompt_lookup_max, adaptive

    def begin(self, prompt_ids: list[int], max_len: int) -> None:
        self.cap = 2                                 # current proposal length cap (adaptive mode)
        self.last: tuple[int, list[int]] = (0, [])   # (length of seq when proposed, the proposal)

    def propose(self, seq: list[int], k: int, params: SamplingParams,
                generator) -> tuple[list[int], torch.Tensor | None]:
        guess = ngram_propose(seq, self.min_n, self.max_n, min(k, self.cap) if self.adaptive else k)
        self.last = (len(seq), guess)
        return guess, None

    def accepted(self, seq: list[int]) -> None:
        (start, guess), self.last = self.last, (0, [])
        if not guess:
            return
        n = len(commonprefix([seq[start:start + len(guess)], guess]))      # guesses accepted
        self.cap = min(2 * self.cap, 64) if n == len(guess) else max(1, n + 1)
