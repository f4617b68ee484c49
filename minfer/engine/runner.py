"""The model runner: a scheduled step -> one forward over the flattened batch -> logits to sample.

The ONLY place a batch is flattened: chunks ``(request, start, num_tokens)`` -> input ids, positions,
slots, block-table rows and logits indices, one Python loop over chunks and vectorized ops after
(the worked example: docs/architecture.md). vLLM: ``GPUModelRunner._prepare_inputs`` and
``execute_model`` (``vllm/v1/worker/gpu_model_runner.py``); nano-vllm: ``ModelRunner.prepare_prefill/decode``.
"""
import dataclasses
import warnings
from typing import Callable, Sequence

import torch

from minfer.devices import to_device
from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.kv.coordinator import KVCacheCoordinator, kv_cache_groups
from minfer.kv.paged import PagedBatch, PagedKVCache


def prepare_batch(kv_manager: KVCacheManager, chunks: Sequence, device="cpu") -> tuple[torch.Tensor, PagedBatch]:
    """``chunks`` (each with .request, .start, .num_tokens; slots reserved) -> (input_ids (1, N), PagedBatch)."""
    if not chunks:
        raise ValueError("a batch needs at least one scheduled chunk")
    # The one loop over sequences: their token ids and three integers each; the rest is vectorized.
    ids, rows, starts, qlens = [], [], [], []
    for i, c in enumerate(chunks):
        start, n = c.start, c.num_tokens
        row, reserved = kv_manager.row(c.request.request_id)
        if not 0 <= start < start + n <= reserved:
            raise ValueError(f"chunk {i}: positions [{start}, {start + n}) of request "
                             f"{c.request.request_id!r} are not reserved (it has {reserved} slots)")
        ids += c.request.all_token_ids[start:start + n]
        rows.append(row)
        starts.append(start)
        qlens.append(n)
    starts, qlens = torch.tensor(starts), torch.tensor(qlens)                 # (S,) each
    seq_lens = starts + qlens                                                 # (S,) context after this forward
    ends = qlens.cumsum(0)                                                    # (S,) one past each one's last row
    if len(ids) == len(chunks):                                               # decodes only: one token each
        seq_of, positions = torch.arange(len(chunks)), starts
    else:
        seq_of = torch.repeat_interleave(torch.arange(len(chunks)), qlens)    # (N,) sequence of each token
        positions = torch.arange(len(ids)) + (starts - ends + qlens)[seq_of]  # (N,) start + offset in chunk
    cols = -(-int(seq_lens.max()) // kv_manager.block_size)                   # blocks of the longest context
    metas = []
    for mgr in getattr(kv_manager, "groups", [kv_manager]):                   # local/global: a table per KV group
        tables = mgr.tables.cpu[torch.tensor(rows), :cols]                    # (S, cols) host rows
        slots = mgr.batch_slot_mapping(chunks, tables, seq_of, positions)     # (N,) where each K/V goes
        device_tables = tables if mgr.tables.device.type == "cpu" else \
            mgr.tables.device_table()[to_device(rows, device, torch.long), :cols]
        # Every input goes to the device by a copy the host does not wait for (minfer.devices.to_device).
        metas.append(PagedBatch(query_lens=qlens, seq_lens=seq_lens, block_tables=to_device(device_tables, device),
                                slot_mapping=to_device(slots, device), logits_indices=to_device(ends - 1, device),
                                positions=to_device(positions, device)[None]))
    metas[0].groups = metas if len(metas) > 1 else None
    return to_device([ids], device, torch.long), metas[0]


def with_token_rows(meta: PagedBatch, sample_rows: Sequence[int], token_rows: Sequence[int]) -> tuple:
    """Append flattened rows to the rows the LM head runs on -> (meta, sample rows that include them)."""
    S, rows = len(meta.logits_indices), to_device(list(token_rows), meta.logits_indices.device, torch.long)
    meta = dataclasses.replace(meta, logits_indices=torch.cat([meta.logits_indices, rows]))
    return meta, list(sample_rows) + list(range(S, S + len(token_rows)))


class ModelRunner:
    """Owns the paged KV cache and its block manager. ``execute(chunks, sample_rows)`` -> (len(sample_rows),
    vocab): the logits of the last token of each chunk listed; it is ``prepare_batch`` + ``execute_model``
    (parallel followers call only the second, ``minfer.distributed.engine``). ``enforce_eager=False``:
    decode-only steps on the static path (``engine/cuda_graph.py``) and a scratch block for padded rows.
    A local/global model gets a ``KVCacheCoordinator`` (``minfer/kv/coordinator.py``)."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = True,
                 attention: str = "sdpa", attention_mode: str = "split", kv_cache_dtype: str = "auto",
                 enforce_eager: bool = True, max_num_seqs: int = 32, compile: bool = False,
                 max_seq_len_to_capture: int | None = None, decode_kernel: str = "auto",
                 kv_manager_cls: Callable[..., KVCacheManager] = KVCacheManager, max_num_batched_tokens: int = 512):
        self.model, self.attention = model, attention
        w = model.model.embed_tokens.weight
        scratch = 0 if enforce_eager else 1                     # the static path's scratch block
        self.cache = PagedKVCache(model.cfg, num_blocks + scratch, block_size, dtype=w.dtype, device=w.device,
                                  attention=attention, attention_mode=attention_mode,
                                  kv_cache_dtype=kv_cache_dtype, decode_kernel=decode_kernel)
        pool = BlockPool(num_blocks + scratch, block_size, enable_prefix_caching)
        self.static = None
        if not enforce_eager:
            from minfer.engine.cuda_graph import StaticDecodeRunner
            scratch_block = pool.reserve_block()
            try:
                with torch.no_grad():
                    self.static = StaticDecodeRunner(model, self.cache, scratch_block, max_num_seqs,
                                                     attention=attention, max_context=max_seq_len_to_capture,
                                                     compile=compile)
            except RuntimeError as e:      # e.g. a backend that reads the device inside a CUDA graph capture
                if w.device.type != "cuda":
                    raise
                warnings.warn(f"CUDA graph capture failed, decode steps run eager: {e}", stacklevel=2)
        elif compile:
            raise ValueError("compile=True compiles the static decode step, so it needs enforce_eager=False "
                             "(or unset); with enforce_eager=True every step runs eager, as in vLLM")
        if model.cfg.is_hybrid and kv_manager_cls is KVCacheManager:          # a block table per KV group
            windows = [w for w, _ in kv_cache_groups(model.cfg)]
            self.kv_manager = KVCacheCoordinator(pool, windows, w.device, max_num_batched_tokens)
        else:
            self.kv_manager = kv_manager_cls(pool, device=w.device)
        self.device = w.device
        self.vocab_size = model.cfg.vocab_size

    @torch.no_grad()
    def execute(self, chunks: Sequence, sample_rows: Sequence[int], token_rows: Sequence[int] = ()) -> torch.Tensor:
        """``token_rows``: rows of the flattened batch (0 .. N - 1) whose logits are wanted too, after
        the sample rows' (prompt logprobs, ``minfer/logprobs.py``)."""
        input_ids, meta = prepare_batch(self.kv_manager, chunks, self.device)
        copies = self.kv_manager.take_pending_copies()
        if token_rows:
            meta, sample_rows = with_token_rows(meta, sample_rows, token_rows)
        elif self.static is not None and self.static.fits(meta):  # decodes only: the static path
            self.cache.copy_blocks(copies)                       # copy-on-write first
            return self.static.run(input_ids, meta, sample_rows)
        return self.execute_model(input_ids, meta, sample_rows, copies)

    @torch.no_grad()
    def execute_model(self, input_ids: torch.Tensor, meta: PagedBatch, sample_rows: Sequence[int],
                      copies: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """The forward half of ``execute`` on a batch flattened by ``prepare_batch``: every rank of a
        parallel group calls it on the broadcast batch (``minfer.distributed.engine``; vLLM's workers)."""
        self.cache.copy_blocks(copies)                                       # copy-on-write first
        self.cache.set_batch(meta)
        rows = meta.logits_indices[to_device(list(sample_rows), self.device, torch.long)]
        logits = self.model(input_ids, meta.positions, kv_cache=self.cache, attention=self.attention,
                            logits_indices=rows)                            # (1, K, V)
        return logits[0]
