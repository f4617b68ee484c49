"""Pipeline parallelism: the layers split into stages, one per rank, hidden states sent on; micro-batches
(GPipe, Huang et al. 2019) shrink the bubble to (S - 1) / (M + S - 1). vLLM: ``get_pp_group``,
``IntermediateTensors``, ``PPMissingLayer`` (docs/parallelism.md).
"""
import time
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn

from minfer.distributed import comm
from minfer.kv.base import NO_CACHE
from minfer.model import rope_cos_sin


def stage_layers(num_layers: int, rank: int, world: int, share_group: int = 1) -> range:
    """Layer indices of stage ``rank``: contiguous, as even as possible, never cutting a KV-sharing group."""
    if num_layers < world:
        raise ValueError(f"pipeline_parallel_size={world} is more than num_hidden_layers={num_layers}")
    groups = -(-num_layers // share_group)
    if groups < world:
        raise ValueError(f"pipeline_parallel_size={world} is more than the {groups} KV-sharing groups")
    bounds = [min(num_layers, (groups * r // world) * share_group) for r in range(world + 1)]
    bounds[-1] = num_layers
    return range(bounds[rank], bounds[rank + 1])


class PipelineStage(nn.Module):
    """One rank's part of a ``Transformer``: its layers, the embedding (first stage), the final norm and LM
    head (last); ``forward`` has its signature; ``timeline``: (micro-batch, start, end) of each compute."""

    def __init__(self, model, rank: int, world: int):
        super().__init__()
        cfg = model.cfg
        self.cfg, self.rank, self.world = cfg, rank, world
        self.layer_ids = stage_layers(cfg.num_hidden_layers, rank, world, cfg.kv_share_group)
        self.model = model.model                                    # keeps HF names: model.layers.i
        for i in range(cfg.num_hidden_layers):
            if i not in self.layer_ids:
                self.model.layers[i] = nn.Identity()               # vLLM: PPMissingLayer
        self.is_first, self.is_last = rank == 0, rank == world - 1
        self.lm_head = getattr(model, "lm_head", None)
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.compute_logits = model.compute_logits
        self.timeline: list[tuple[int, float, float]] = []

    def _run_layers(self, x, positions, kv_cache, backend):
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)       # (B, 1, T, hd) each
        cache = NO_CACHE if kv_cache is None else kv_cache                 # as Transformer.forward
        view = None                              # K/V shared with the group's first layer (minfer.kv.base)
        for i in self.layer_ids:
            x, view = self.model.layers[i](x, cos, sin, positions, cache, view, backend)
        return x

    def _pipeline(self, pieces, kv_cache, attention, head, out_shape, dim: int) -> torch.Tensor:
        """Run micro-batches ``pieces`` = [(ids (b, n), positions, paged metadata or None)] through stages.
        Each stage embeds (first) or receives a micro-batch, runs its layers, sends the hidden states on
        without waiting and goes on with the next (stage 0 on micro-batch 1 while stage 1 is on 0). The
        last stage's ``head(m, x)`` logits (None: no rows) are concatenated along ``dim`` and broadcast."""
        from minfer.attention import get_backend
        backend = get_backend(attention) if isinstance(attention, str) else attention
        h, dtype = self.cfg.hidden_size, self.model.norm.weight.dtype
        outs, pending = [], []
        for m, (ids, pos, meta) in enumerate(pieces):
            if meta is not None:
                kv_cache.set_batch(meta)
            if self.is_first:
                x = self.model.embed_tokens(ids)                            # (b, n, h)
            else:
                x = comm.recv(torch.empty(*ids.shape, h, dtype=dtype, device=ids.device), self.rank - 1)
            t0 = time.perf_counter()
            x = self._run_layers(x, pos, kv_cache, backend)
            self.timeline.append((m, t0, time.perf_counter()))
            if not self.is_last:                      # hand on, and go on with the next micro-batch
                pending.append(dist.isend(x.contiguous(), self.rank + 1))
                comm.COMM_STATS.add("send", x.nbytes, 0.0)
            elif (y := head(m, x)) is not None:
                outs.append(y)
        for w in pending:
            comm._timed("send", 0, w.wait)
        logits = torch.cat(outs, dim=dim) if outs else torch.empty(out_shape, dtype=dtype, device=ids.device)
        comm._timed("broadcast", logits.nbytes, lambda: dist.broadcast(logits, self.world - 1))
        return logits

    @torch.no_grad()
    def forward(self, input_ids, positions, kv_cache=None, attention="sdpa", last_only=False,
                logits_indices=None, num_microbatches: int = 1):
        """Logits (B, T or 1 or K, vocab) on every rank; the batch goes through in micro-batches."""
        B, T = input_ids.shape
        if num_microbatches > 1 and kv_cache is not None:
            raise ValueError("micro-batches need kv_cache=None (a cache holds one batch layout)")

        def head(_m, x):
            if last_only:
                x = x[:, -1:]
            elif logits_indices is not None:
                x = x[:, logits_indices]
            return self.compute_logits(self.model.norm(x))
        pieces = [(input_ids[rows], positions[rows], None)
                  for rows in torch.arange(B).tensor_split(num_microbatches) if len(rows)]
        T_out = 1 if last_only else (len(logits_indices) if logits_indices is not None else T)
        return self._pipeline(pieces, kv_cache, attention, head, (B, T_out, self.cfg.vocab_size), dim=0)

    @torch.no_grad()
    def forward_paged_microbatches(self, input_ids, metas, rows, kv_cache, attention="sdpa"):
        """The serving engine's flattened batch (1, N) in micro-batches of whole sequences -> logits (1, sum
        of rows, vocab). ``metas[m]``: micro-batch m's ``PagedBatch``; ``rows[m]``: its rows for logits."""
        bounds = [0, *accumulate(meta.num_tokens for meta in metas)]
        pieces = [(input_ids[:, a:b], meta.positions, meta) for a, b, meta in zip(bounds, bounds[1:], metas)]

        def head(m, x):
            if rows[m]:
                return self.compute_logits(self.model.norm(x[:, metas[m].logits_indices[rows[m]]]))
        K = sum(len(w) for w in rows)
        return self._pipeline(pieces, kv_cache, attention, head, (1, K, self.cfg.vocab_size), dim=1)


def gpipe_schedule(num_stages: int, num_microbatches: int) -> list[list[int]]:
    """GPipe's forward, slot by slot: row s lists the micro-batch stage s runs in each of the M + S - 1
    time slots (-1: idle). Micro-batch m reaches stage s in slot s + m (Huang et al. 2019, figure 2)."""
    slots = num_microbatches + num_stages - 1
    return [[t - s if 0 <= t - s < num_microbatches else -1 for t in range(slots)] for s in range(num_stages)]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """GPipe's idle share of a forward: (S - 1) / (M + S - 1) (equal stages, no communication cost)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)
