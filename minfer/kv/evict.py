"""KV-cache eviction: keep a fixed budget of tokens per layer, drop the rest.

Policies: ``streaming`` (StreamingLLM, Xiao et al. 2024: sinks + recent), ``h2o`` (Zhang et al.
2023: most attention received + recent), ``snapkv`` (Li et al. 2024: the last prompt queries vote
once). Scores are taken in ``attend``. Design and limits: docs/kv-and-attention.md.
"""
import math

import torch

from minfer.attention.mask import allowed
from minfer.kv.base import DenseKVCache, KVView

POLICIES = ("streaming", "h2o", "snapkv")


def h2o_keep(scores: list[float], budget: int, recent: int) -> list[int]:
    """Sorted indices of the S tokens (oldest first) H2O keeps: the ``recent`` newest, then the highest
    accumulated attention, ``budget`` in all."""
    S = len(scores)
    if S <= budget:
        return list(range(S))
    recent = min(recent, budget)
    newest = list(range(S - recent, S))
    older = sorted(range(S - recent), key=lambda i: -scores[i])[:budget - recent]
    return sorted(older + newest)


class EvictingKVCache(DenseKVCache):
    """A KV cache that never stores more than ``budget`` tokens per layer (policy: see module doc)."""

    def __init__(self, model, batch_size: int, budget: int, policy: str = "streaming", *, sinks: int = 4,
                 recent: int | None = None, obs_window: int = 16):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive integer, got {budget!r}")
        if sinks < 0 or obs_window < 1:
            raise ValueError(f"sinks must be >= 0 and obs_window >= 1, got {sinks}, {obs_window}")
        cfg = model.cfg
        self.cfg, self.policy, self.budget, self.batch_size = cfg, policy, budget, batch_size
        self.sinks = min(sinks, budget)
        self.recent = min(budget, recent if recent is not None else max(1, budget // 2))  # H2O: half recent
        self.obs_window = obs_window
        L = cfg.num_kv_layers
        self.k: list[torch.Tensor | None] = [None] * L      # (B, nkv, S, hd), S <= budget
        self.v: list[torch.Tensor | None] = [None] * L
        self.pos: list[torch.Tensor | None] = [None] * L    # (B, S) positions, -1 = forgotten
        self.score: list[torch.Tensor | None] = [None] * L  # (B, S) the policy's keep-priority
        self._written: dict[int, torch.Tensor] = {}        # layer -> priorities of the keys update returned

    def update(self, layer, k, v, positions):
        """k, v (B, nkv, T, hd) at positions (B, T) -> kept + new keys/values and their positions."""
        if self.k[layer] is None:
            B, nkv, _, hd = k.shape
            self.k[layer], self.v[layer] = k.new_zeros(B, nkv, 0, hd), v.new_zeros(B, nkv, 0, hd)
            self.pos[layer] = positions.new_zeros(B, 0)
            self.score[layer] = torch.zeros(B, 0, dtype=torch.float32, device=k.device)
        keys = torch.cat([self.k[layer], k], dim=2)                          # (B, nkv, S + T, hd)
        values = torch.cat([self.v[layer], v], dim=2)
        key_pos = torch.cat([self.pos[layer], positions], dim=1)              # (B, S + T)
        self._written[layer] = torch.cat([self.score[layer], self._new_scores(positions)], dim=1)
        return KVView(keys, values, key_pos)

    def attend(self, layer, q, view, positions, backend, window=None):
        """The backend's attention; then, in the layer that wrote this forward's K/V, score and evict."""
        out = backend(q, view.keys, view.values, positions, view.key_pos, window=window)
        score = self._written.pop(layer, None)
        if score is not None:            # layers sharing this K/V attend to the same view later
            score = self._observe(layer, q, view.keys, view.key_pos, positions, score)
            self._keep(layer, view.keys, view.values, view.key_pos, score)
        return out

    def truncate(self, length: int) -> None:
        """Forget positions >= length (they become invisible and are evicted first)."""
        for i, p in enumerate(self.pos):
            if p is not None:
                gone = p >= length
                self.pos[i] = p.masked_fill(gone, -1)
                self.score[i] = self.score[i].masked_fill(gone, -math.inf)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)

    def num_tokens(self, layer: int = 0) -> int:
        """Tokens stored now in ``layer`` (never more than ``budget``)."""
        return 0 if self.pos[layer] is None else self.pos[layer].shape[1]

    def _new_scores(self, positions: torch.Tensor) -> torch.Tensor:
        """Initial keep-priority of new tokens (B, T)."""
        if self.policy == "streaming":       # newest first, sinks forever
            p = positions.float()
            return torch.where(positions < self.sinks, math.inf, p)
        if self.policy == "snapkv" and self.pos[0] is not None and self.pos[0].shape[1] > 0:
            return torch.full(positions.shape, -1.0, device=positions.device)   # generated: recent window only
        return torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)

    def _observe(self, layer, q, keys, key_pos, positions, score):
        """H2O: add this forward's attention to every key. SnapKV: at prefill, the observation window votes."""
        if self.policy == "streaming":
            return score
        if self.policy == "snapkv":
            is_prefill = self.pos[layer].shape[1] == 0 and positions.shape[1] > 1
            if not is_prefill:
                return score
            q, positions = q[:, :, -self.obs_window:], positions[:, -self.obs_window:]
        return score + self._attention(q, keys, key_pos, positions)           # (B, S + T)

    def _attention(self, q, keys, key_pos, q_pos) -> torch.Tensor:
        """Attention mass each key receives from the queries q (B, nh, T, hd), all heads summed: (B, S)."""
        B, nh, T, hd = q.shape
        nkv = keys.shape[1]
        q = q.reshape(B, nkv, -1, hd)                                           # (B, nkv, G*T, hd)
        logits = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(hd)  # (B, nkv, G*T, S)
        ok = allowed(q_pos, key_pos, self.cfg.sliding_window)                  # (B, T, S)
        ok = ok[:, None].expand(B, nh // nkv, T, -1).reshape(B, 1, -1, ok.shape[-1])   # (B, 1, G*T, S)
        probs = torch.softmax(logits.masked_fill(~ok, -math.inf), dim=-1).nan_to_num(0.0)
        return probs.sum(dim=(1, 2))                                            # (B, S)

    def _keep(self, layer, keys, values, key_pos, score) -> None:
        """Store the ``budget`` highest-priority tokens; the ``recent`` newest are always kept."""
        S = key_pos.shape[1]
        if S <= self.budget:
            keep = torch.arange(S, device=key_pos.device)[None].expand(key_pos.shape[0], S)
        else:
            pri = score.clone()
            if self.policy != "streaming":   # protect the recent window (streaming: already newest-first)
                newest = key_pos.masked_fill(key_pos < 0, -1).topk(self.recent, dim=1).indices
                pri.scatter_(1, newest, math.inf)
            pri = pri.masked_fill(key_pos < 0, -math.inf)                      # forgotten tokens go first
            keep = pri.topk(self.budget, dim=1).indices.sort(dim=1).values      # (B, budget), position order
        idx = keep[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        self.k[layer], self.v[layer] = keys.gather(2, idx), values.gather(2, idx)
        self.pos[layer], self.score[layer] = key_pos.gather(1, keep), score.gather(1, keep)
