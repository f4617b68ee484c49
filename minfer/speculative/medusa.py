"""Medusa heads (Cai et al. 2024): guess several future tokens from ONE hidden state, verify a tree of
guesses in ONE forward; greedy, so the output equals plain greedy decoding.

    head_j(h) = lm_head(h + SiLU(W_j h + b_j))        trained to predict token t+2+j

``medusa_generate``: the single-request loop over a static tree; the engine verifies the heads' top-1
chain (``engine.py``). vLLM: ``vllm/v1/spec_decode/medusa.py`` (docs/speculative.md).
"""
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minfer.generate import StopRule, model_device_dtype
from minfer.metrics import RequestStats
from minfer.kv import ContiguousKVCache
from minfer.sampling import SamplingParams
from minfer.speculative.lookahead import TreeAttentionCache
from minfer.speculative.loop import emit
from minfer.speculative.stats import SpecStats

# A static tree for K = 3 heads (16 nodes), in priority order: every prefix of it is a tree (ancestors
# first), so ``DEFAULT_TREE[:n]`` is the best n-node tree by this ordering. A CPU wants few nodes (every
# node costs a row of the 49152 x 576 LM head); a GPU verifies dozens for the price of one.
DEFAULT_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 0, 0), (0, 1), (2,), (1, 0), (0, 0, 1),
    (3,), (0, 2), (1, 1), (0, 1, 0), (2, 0), (1, 0, 0), (0, 0, 2), (2, 0, 0),
)


class MedusaHeads(nn.Module):
    """K residual blocks on the base model's last hidden state; logits through the base LM head."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for p in self.blocks.parameters():             # zero blocks: each head starts as the LM head
            nn.init.zeros_(p)

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """hidden (..., h) -> the first n = num_heads (default K) heads' hidden states (..., n, h)."""
        return torch.stack([hidden + F.silu(b(hidden)) for b in self.blocks[:num_heads]], dim=-2)

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """A folder: heads.safetensors + medusa_config.json (written atomically)."""
        from safetensors.torch import save_file

        from minfer.atomic import atomic_dir, write_json
        with atomic_dir(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp / "heads.safetensors"))
            write_json(tmp / "medusa_config.json", {"hidden_size": self.hidden_size, "num_heads": self.num_heads,
                                                    **(extra or {})})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "MedusaHeads":
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / "medusa_config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Medusa heads folder (no medusa_config.json)")
        cfg = json.loads((path / "medusa_config.json").read_text())
        heads = cls(cfg["hidden_size"], cfg["num_heads"])
        heads.load_state_dict(load_file(str(path / "heads.safetensors")))
        return heads.eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def load_heads(path: str) -> MedusaHeads:
    """``MedusaHeads.load``, remembered (``speculative="medusa:PATH"`` loads once per path)."""
    return MedusaHeads.load(path)


# --- The static tree: nodes, parents, depths, the attention mask ---
@dataclass
class MedusaTree:
    paths: list[tuple[int, ...]]   # (N,) node i = paths[i], by depth; the root (forward index 0) not listed
    parent: list[int]              # (N,) forward index of each node's parent (0 = the root)
    depth: list[int]               # (N,) 1 for head 0's guesses, 2 for head 1's, ...
    mask: torch.Tensor             # (N + 1, N + 1) bool: row = query, column = key (root included)

    @property
    def max_rank(self) -> int:
        return max((max(p) for p in self.paths), default=-1) + 1

    @property
    def max_depth(self) -> int:
        return max(self.depth, default=0)


def build_tree(paths: Sequence[Sequence[int]], max_depth: int | None = None) -> MedusaTree:
    """Dedupe the paths, add missing ancestors, sort by depth, build the ancestor mask. Forward index 0
    is the root; node i (0-based in the sorted ``paths``) is forward index i + 1."""
    nodes: set[tuple[int, ...]] = set()
    for p in paths:
        p = tuple(int(r) for r in p)
        if not p or min(p) < 0:
            raise ValueError(f"a tree path is a non-empty tuple of ranks >= 0, got {p!r}")
        for d in range(1, len(p) + 1):             # every ancestor is a node too
            nodes.add(p[:d])
    if max_depth is not None:
        nodes = {p for p in nodes if len(p) <= max_depth}
    order = sorted(nodes, key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(order)}
    parent = [index.get(p[:-1], 0) for p in order]
    n = len(order) + 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, 0] = True
    for i, p in enumerate(order):
        for d in range(1, len(p) + 1):
            mask[i + 1, index[p[:d]]] = True       # its ancestors and itself
    return MedusaTree(order, parent, [len(p) for p in order], mask)


def tree_mask(paths: Sequence[Sequence[int]]) -> torch.Tensor:
    """The (N + 1, N + 1) tree attention mask of ``paths`` (given in ``build_tree``'s order; row 0 = the root)."""
    return build_tree(paths).mask


def tree_tokens(tree: MedusaTree, head_topk: list[list[int]]) -> list[int]:
    """The token of each node: node (r_0, .., r_d) carries rank r_d of head d. head_topk[d] = head d's ids."""
    return [head_topk[len(p) - 1][p[-1]] for p in tree.paths]


def accept_path(tree: MedusaTree, tokens: list[int], argmax: list[int]) -> list[int]:
    """Greedy walk -> forward indices of the accepted nodes (root excluded), in depth order.
    ``tokens`` (N,): node tokens; ``argmax`` (N + 1,): the base model's argmax at root + nodes."""
    children: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parent):
        children.setdefault(par, []).append(i + 1)
    accepted, cur = [], 0
    while True:
        want = argmax[cur]
        nxt = next((c for c in children.get(cur, []) if tokens[c - 1] == want), None)
        if nxt is None:
            return accepted
        accepted.append(nxt)
        cur = nxt


# --- Decoding ---
@contextlib.contextmanager
def last_hidden(model):
    """Keep the last decoder layer's output (B, T, h), before the final norm, in ``box[0]``: every row,
    even when the forward runs its norm and LM head on a few (a forward hook, as ``transformers`` reads
    ``output_hidden_states``)."""
    box: list[torch.Tensor] = []

    def hook(_module, _inp, out):
        box[:] = [out[0]]                             # a decoder layer returns (x, kv view)
    handle = model.model.layers[-1].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def base_and_head_logits(model, heads: MedusaHeads, x: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
    """Last-layer outputs x (N, h) -> logits (N, 1 + n, V): the base model's next token and the first
    n = num_heads (default all; pass the tree's depth) heads' guesses, in ONE pass over the LM head."""
    hidden = model.model.norm(x)                                            # (N, h)
    return model.compute_logits(torch.cat([hidden[:, None], heads(hidden, num_heads)], dim=1))


@torch.no_grad()
def medusa_generate(
    model,
    heads: MedusaHeads,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    tree: Sequence[Sequence[int]] | MedusaTree = DEFAULT_TREE,
    eos_token_ids: list[int] = (),
    attention: str = "sdpa",
    stats: SpecStats | None = None,
    metrics: RequestStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[int]:
    """Yield new token ids, identical to plain greedy decoding; one target forward per tree."""
    if not params.greedy:
        raise ValueError("Medusa decoding is greedy-only here: set SamplingParams.temperature=0")
    full = tree if isinstance(tree, MedusaTree) else build_tree(tree)
    if full.max_depth > heads.num_heads:
        raise ValueError(f"the tree is {full.max_depth} deep but there are only {heads.num_heads} Medusa heads")
    budget = StopRule(model, prompt_ids, params, eos_token_ids, metrics, clock)
    device, dtype = model_device_dtype(model)
    cache = ContiguousKVCache(model.cfg, 1, budget.total, dtype=dtype, device=device)
    stats = stats if stats is not None else SpecStats()
    heads = heads.to(device=device, dtype=dtype)
    no_rows = torch.empty(0, dtype=torch.long, device=device)   # the forward skips its own LM head

    with last_hidden(model) as hidden:
        x = torch.tensor([list(prompt_ids)], device=device)
        model(x, torch.arange(len(prompt_ids), device=device)[None], kv_cache=cache, attention=attention,
              logits_indices=no_rows)
        depth = max(full.max_depth, 1)                              # heads read: no tree is deeper
        logits = base_and_head_logits(model, heads, hidden[0][0, -1:], depth)[0]  # (1 + depth, V)
        seq = list(prompt_ids) + [int(logits[0].argmax())]
        yield from emit(budget, seq[-1:])
        while not budget.done:
            P = len(seq) - 1
            t = full if budget.room >= full.max_depth else build_tree(full.paths, max_depth=budget.room)
            guesses = logits[1:].topk(min(max(t.max_rank, 1), logits.shape[-1]), dim=-1).indices.tolist()
            tokens = tree_tokens(t, guesses) if t.paths else []
            tc = TreeAttentionCache(cache, t.mask)
            ids = torch.tensor([[seq[-1]] + tokens], device=device)                 # (1, N + 1)
            pos = torch.tensor([[P] + [P + d for d in t.depth]], device=device)       # (1, N + 1)
            model(ids, pos, kv_cache=tc, attention=attention, logits_indices=no_rows)
            both = base_and_head_logits(model, heads, hidden[0][0], depth)        # (N + 1, 1 + depth, V)
            argmax = both[:, 0].argmax(-1).tolist()
            path = accept_path(t, tokens, argmax)
            stats.record(t.max_depth, len(path))
            tc.commit([0] + path)                    # K/V of the root and the accepted nodes
            last = path[-1] if path else 0
            logits = both[last]                      # the next step's base token and head guesses
            emitted = [tokens[i - 1] for i in path] + [argmax[last]]
            seq += emitted
            yield from emit(budget, emitted)
