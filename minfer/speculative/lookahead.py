"""Lookahead decoding (Fu, Bailis, Stoica & Zhang 2024): Jacobi guesses and their verification in ONE
forward, no draft model; greedy, so the output equals plain greedy decoding.

The 2-D window (W columns x N - 1 levels) and the candidates share one forward under a tree mask
(docs/speculative.md). vLLM's tree attention: ``vllm/v1/attention/backends/tree_attn.py``.
"""
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from minfer.attention.mask import allowed
from minfer.metrics import RequestStats
from minfer.generate import StopRule, forward_tokens, model_device_dtype
from minfer.kv import ContiguousKVCache
from minfer.kv.base import KVView
from minfer.sampling import SamplingParams, make_generator
from minfer.speculative.loop import emit
from minfer.speculative.rejection import verify_greedy
from minfer.speculative.stats import SpecStats


# --- A KV cache wrapper that attends with an explicit (tree) mask ---
class TreeAttentionCache:
    """Wraps a ContiguousKVCache for one forward whose new tokens see each other through ``tree_mask``:
    ``update`` does not write (guesses share positions), ``attend`` applies ``[allowed(prefix) | tree_mask
    & window]``, ``commit(indices)`` writes the verified tokens' K/V (docs/speculative.md)."""

    def __init__(self, inner: ContiguousKVCache, tree_mask: torch.Tensor):
        if not isinstance(inner, ContiguousKVCache):
            raise ValueError(f"TreeAttentionCache wraps a ContiguousKVCache, got {type(inner).__name__}")
        self.inner, self.tree_mask = inner, tree_mask      # tree_mask (T, T) bool: query i may see new key j
        self.new_kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def update(self, layer, k, v, positions) -> KVView:
        """Keep k, v (1, nkv, T, hd) of the new tokens aside; return the cached prefix."""
        self.new_kv[layer] = (k, v, positions)
        L = int(self.inner.lengths[0])
        prefix_pos = torch.arange(L, device=k.device)[None]                      # (1, L)
        return KVView(self.inner.k[layer, :, :, :L], self.inner.v[layer, :, :, :L], prefix_pos)

    def attend(self, layer, q, view: KVView, positions, backend, window=None):
        """q (1, nh, T, hd) -> (1, nh, T, hd). ``backend`` is unused: it takes positions, not a mask."""
        (pk, pv, ppos), (nk, nv, _) = view, self.new_kv[layer]
        keys, values = torch.cat([pk, nk], dim=2), torch.cat([pv, nv], dim=2)   # (1, nkv, L + T, hd)
        new_mask = self.tree_mask.to(q.device)[None]                             # (1, T, T)
        if window is not None:
            new_mask = new_mask & ((positions[:, :, None] - positions[:, None, :]) < window)
        mask = torch.cat([allowed(positions, ppos, window), new_mask], dim=2)    # (1, T, L + T)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                              enable_gqa=q.shape[1] != keys.shape[1])

    def commit(self, indices: list[int]) -> None:
        """Write the K/V of new tokens ``indices`` (in position order) into the wrapped cache."""
        idx = torch.tensor(indices, device=self.inner.k.device)
        for layer, (k, v, positions) in self.new_kv.items():
            self.inner.update(layer, k[:, :, idx], v[:, :, idx], positions[:, idx])
        self.new_kv.clear()


# --- The layout of one step: tokens, positions, mask ---
@dataclass
class StepLayout:
    tokens: list[int]               # (T,) the forward's input
    positions: list[int]            # (T,) their positions
    mask: torch.Tensor              # (T, T) bool, row = query, column = key
    levels: list[list[int]]         # levels[l][i]: input index of lookahead token (l, i)
    candidates: list[list[int]]     # candidates[c][j]: input index of candidate c's token j


def step_layout(last_token: int, P: int, levels: list[list[int]], candidates: list[list[int]]) -> StepLayout:
    """Arrange [last token | lookahead levels | verification candidates] and their mask (see module doc)."""
    tokens, positions = [last_token], [P]

    def place(row: list[int], first_position: int) -> list[int]:
        """Append ``row`` at consecutive positions -> its input indices."""
        tokens.extend(row)
        positions.extend(range(first_position, first_position + len(row)))
        return list(range(len(tokens) - len(row), len(tokens)))
    level_idx = [place(row, P + 1 + l) for l, row in enumerate(levels)]
    cand_idx = [place(c, P + 1) for c in candidates]
    T = len(tokens)
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:, 0] = True                                       # everyone sees the last verified token
    for l, row in enumerate(level_idx):
        for i, me in enumerate(row):
            mask[me, level_idx[0][:i + 1]] = True           # level 0, columns 0..i
            for l2 in range(1, l + 1):
                mask[me, level_idx[l2][i]] = True           # column i of levels 1..l (itself included)
    for row in cand_idx:
        for j, me in enumerate(row):
            mask[me, row[:j + 1]] = True                    # its own prefix
    return StepLayout(tokens, positions, mask, level_idx, cand_idx)


class NgramPool:
    """n-grams found by the lookahead branch, keyed by their first token; at most ``per_key`` per key."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self.grams: dict[int, list[tuple[int, ...]]] = {}

    def add(self, first: int, rest: tuple[int, ...]) -> None:
        lst = self.grams.setdefault(first, [])
        if rest in lst:
            lst.remove(rest)
        lst.append(rest)                                    # most recent last
        del lst[:-self.per_key]

    def harvest(self, levels: list[list[int]], new: list[int]) -> None:
        """Column i of the window, then the new guess, is an n-gram: (levels[0][i], ..., levels[-1][i], new[i])."""
        for i, first in enumerate(levels[0]):
            self.add(first, tuple(level[i] for level in levels[1:]) + (new[i],))


# --- The loop ---
@torch.no_grad()
def lookahead_generate(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    window: int = 4,                # W: Jacobi window (columns)
    ngram: int = 3,                 # N: n-gram size (N - 1 lookahead levels, candidates of N - 1 tokens)
    max_candidates: int = 4,        # G: verification candidates per step (pool entries per key)
    eos_token_ids: list[int] = (),
    attention: str = "sdpa",
    stats: SpecStats | None = None,
    metrics: RequestStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """Yield new token ids, identical to plain greedy decoding (``generate_tokens``, temperature 0)."""
    if not params.greedy:
        raise ValueError("lookahead decoding is greedy-only here: set SamplingParams.temperature=0")
    for name, value, lo in (("window", window, 1), ("ngram", ngram, 2), ("max_candidates", max_candidates, 1)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"lookahead {name} must be an integer >= {lo}, got {value!r}")
    budget = StopRule(model, prompt_ids, params, eos_token_ids, metrics, clock)
    device, dtype = model_device_dtype(model)
    cache = ContiguousKVCache(model.cfg, 1, budget.total, dtype=dtype, device=device)
    stats = stats if stats is not None else SpecStats()

    logits = forward_tokens(model, cache, list(prompt_ids), 0, attention, last_only=True)[-1]
    seq = list(prompt_ids) + [int(logits.argmax())]
    yield from emit(budget, seq[-1:])
    # Level 0 starts as tokens drawn from the prompt (the paper: random initial guesses).
    gen = make_generator(0 if params.seed is None else params.seed)
    pick = torch.randint(len(prompt_ids), (window,), generator=gen).tolist()
    levels = [[int(prompt_ids[i]) for i in pick]]
    pool = NgramPool(max_candidates)
    while not budget.done:
        P = len(seq) - 1
        cands = [list(c[:budget.room]) for c in pool.grams.get(seq[-1], [])] if budget.room > 0 else []
        cands = [c for i, c in enumerate(cands) if c and c not in cands[:i]]
        lay = step_layout(seq[-1], P, levels, cands)
        tree = TreeAttentionCache(cache, lay.mask)
        x = torch.tensor([lay.tokens], device=device)
        pos = torch.tensor([lay.positions], device=device)
        argmax = model(x, pos, kv_cache=tree, attention=attention)[0].argmax(-1).tolist()   # (T,)

        # ---- verification branch: the longest candidate run the target agrees with
        best, best_idx = [argmax[0]], []
        for c, idx in zip(cands, lay.candidates):
            emitted = verify_greedy([argmax[0]] + [argmax[j] for j in idx], c)
            if len(emitted) > len(best):
                best, best_idx = emitted, idx[:len(emitted) - 1]
        stats.record(max((len(c) for c in cands), default=0), len(best) - 1)
        tree.commit([0] + best_idx)                 # K/V of the last token + the accepted ones

        # ---- lookahead branch: one Jacobi step, harvest n-grams, slide the window
        new = [argmax[j] for j in lay.levels[-1]]
        if len(levels) < ngram - 1:
            levels.append(new)
        else:
            pool.harvest(levels, new)
            levels = levels[1:] + [new]

        seq += best
        yield from emit(budget, best)
