"""The static decode step: fixed-shape buffers per batch-size bucket, replayed as CUDA graphs on a GPU.

S decodes run in the smallest bucket n >= S; rows S..n-1 are padding that writes to a scratch slot.
On a CPU "replay" calls the same step on the same buffers. vLLM: ``CudagraphDispatcher``,
``GPUModelRunner.capture_model``; nano-vllm: ``ModelRunner.capture_cudagraph``. Why: docs/kernels.md.
"""
import time

import torch

from minfer.devices import to_device
from minfer.validation import check_int
from minfer.kv.paged import PagedBatch, PagedKVCache

# The static width's default cap in keys (vLLM's ``max_seq_len_to_capture``); longer contexts run eager.
MAX_SEQ_LEN_TO_CAPTURE = 8192


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets: powers of two up to ``max_num_seqs``, and ``max_num_seqs`` itself:
    capture_sizes(12) = [1, 2, 4, 8, 12]. (vLLM: 1, 2, 4, then steps of 8; nano-vllm: steps of 16.)"""
    check_int(max_num_seqs, "max_num_seqs", lo=1)
    sizes = [2 ** i for i in range(max_num_seqs.bit_length())]
    return sizes + [max_num_seqs] if sizes[-1] != max_num_seqs else sizes


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest size in ``sizes`` that holds a batch of ``n`` sequences."""
    if not sizes:
        raise ValueError("bucket_for: the list of capture sizes is empty")
    largest = max(sizes)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= largest:
        raise ValueError(f"a decode batch of n={n!r} sequences has no bucket: the capture sizes hold "
                         f"1 to {largest} sequences")
    return min(s for s in sizes if s >= n)


def capture_graph(step, pool=None):
    """Warm ``step()`` up on a side stream (lazy init, cuBLAS workspaces, torch.compile happen there, as
    PyTorch asks), then record one call -> (CUDAGraph, its output, rewritten by each replay). ``pool``:
    share another graph's memory pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class StaticSingleDecode:
    """The single-request loop's decode step on static buffers (gpt-fast's shape): ``step(tok, pos)`` ->
    logits (vocab,) through a ``StaticKVCache``. Build it BEFORE the prefill: the warm-up writes slot 0."""

    def __init__(self, model, cache, attention="sdpa"):
        self.model, self.cache, self.attention = model, cache, attention
        device = cache.k.device
        self.input_ids = torch.zeros(1, 1, dtype=torch.long, device=device)        # (1, 1)
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)        # (1, 1)
        self.graph = None
        if device.type == "cuda":                                   # a CPU calls the same step instead
            self.graph, self.output = capture_graph(self._step)

    def _step(self) -> torch.Tensor:
        return self.model(self.input_ids, self.positions, kv_cache=self.cache, attention=self.attention,
                          last_only=True)                                           # (1, 1, V)

    def step(self, tok: int, pos: int) -> torch.Tensor:
        self.input_ids.fill_(tok)
        self.positions.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
            return self.output[0, -1]                            # overwritten by the next replay
        return self._step()[0, -1]


class StaticDecodeRunner:
    """Decode-only steps on static buffers (nano-vllm's ``graph_vars``), one bucket per batch size: ``run``
    as ``ModelRunner.execute_model`` where ``fits(meta)``. ``compile=True``: torch.compile it."""

    def __init__(self, model, cache: PagedKVCache, scratch_block: int, max_num_seqs: int, *,
                 attention="sdpa", max_context: int | None = None, compile: bool = False,
                 use_cuda_graph: bool | None = None):
        self.model, self.cache, self.attention = model, cache, attention
        self.sizes = capture_sizes(max_num_seqs)
        bs = cache.block_size
        max_context = max_context or min(model.cfg.max_position_embeddings, MAX_SEQ_LEN_TO_CAPTURE)
        check_int(max_context, "max_context", lo=1)
        self.max_blocks = -(-max_context // bs)                  # static width: max_blocks * block_size keys
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * bs
        device = cache.k.device
        B = self.sizes[-1]
        # ---- the static inputs, (largest bucket,...): written in place before every replay
        self.input_ids = torch.zeros(1, B, dtype=torch.long, device=device)        # (1, B)
        self.positions = torch.zeros(1, B, dtype=torch.long, device=device)        # (1, B)
        self.slot_mapping = torch.full((B,), self.scratch_slot, dtype=torch.long, device=device)  # (B,)
        self.context_lens = torch.ones(B, dtype=torch.long, device=device)         # (B,) keys each row sees
        self.block_tables = torch.full((B, self.max_blocks), scratch_block, dtype=torch.long,
                                       device=device)                              # (B, max_blocks)
        self.query_lens = torch.ones(B, dtype=torch.long, device=device)           # (B,) one token each
        self.rows = torch.arange(B, device=device)                                 # (B,) logits rows
        self.step = self._step
        self.compile_seconds = self.capture_seconds = 0.0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}               # bucket -> the graph's logits (1, n, V)
        self.graph_pool = None
        if compile:
            self.step = torch.compile(self._step)      # automatic dynamic: n becomes symbolic, the pool stays static
            t0 = time.perf_counter()
            for n in self.sizes[:2]:     # batch 1 is compiled apart (size 1 is specialised), 2.. share one
                self._pad(0, n)
                self.step(n)
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.compile_seconds = time.perf_counter() - t0
        self.use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph:
            self.capture()

    def _step(self, n: int) -> torch.Tensor:
        """One decode forward on the first n rows of the static buffers -> logits (1, n, vocab): only
        tensor ops on fixed shapes, what a CUDA graph records."""
        meta = PagedBatch(query_lens=self.query_lens[:n], seq_lens=self.context_lens[:n],
                          block_tables=self.block_tables[:n], slot_mapping=self.slot_mapping[:n],
                          logits_indices=self.rows[:n], positions=self.positions[:, :n])
        self.cache.set_static_batch(meta)
        return self.model(self.input_ids[:, :n], meta.positions, kv_cache=self.cache,
                          attention=self.attention)                                 # (1, n, V)

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) become padding: token 0 at position 0, K/V to the scratch slot."""
        if start < end:
            self.input_ids[:, start:end] = 0
            self.positions[:, start:end] = 0
            self.slot_mapping[start:end] = self.scratch_slot
            self.context_lens[start:end] = 1
            self.block_tables[start:end, 0] = self.scratch_block   # the only column a context of 1 reads

    def capture(self) -> None:
        """One CUDA graph per bucket, largest first, sharing one memory pool (padding rows only)."""
        t0 = time.perf_counter()
        self._pad(0, self.sizes[-1])                             # warm-ups and captures write the scratch slot
        for n in reversed(self.sizes):
            graph, self.outputs[n] = capture_graph(lambda: self.step(n), self.graph_pool)
            if self.graph_pool is None:
                self.graph_pool = graph.pool()                   # the smaller buckets reuse this memory
            self.graphs[n] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0

    def fits(self, meta: PagedBatch) -> bool:
        """Decodes only (one token per sequence), few enough, contexts within the static width."""
        S = len(meta.query_lens)
        return (meta.num_tokens == S and S <= self.sizes[-1]
                and meta.block_tables.shape[1] <= self.max_blocks)

    def load(self, input_ids: torch.Tensor, meta: PagedBatch) -> int:
        """Copy a flattened decode batch into the static buffers and pad it -> its bucket n."""
        S, cols = len(meta.query_lens), meta.block_tables.shape[1]
        n = bucket_for(S, self.sizes)
        self.input_ids[:, :S] = input_ids
        self.positions[:, :S] = meta.positions
        self.slot_mapping[:S] = meta.slot_mapping
        self.context_lens[:S] = to_device(meta.seq_lens, self.rows.device)   # host -> device, not waited for
        self.block_tables[:S, :cols] = meta.block_tables         # columns past cols: stale ids, read and masked
        self._pad(S, n)
        return n

    def run(self, input_ids: torch.Tensor, meta: PagedBatch, sample_rows) -> torch.Tensor:
        """Copy a flattened decode batch into the static buffers, pad it, replay -> logits (K, vocab)."""
        S, n = len(meta.query_lens), self.load(input_ids, meta)
        if self.use_cuda_graph:
            self.graphs[n].replay()
            logits = self.outputs[n]                             # overwritten by the next replay
        else:
            logits = self.step(n)
        rows = to_device(list(sample_rows), self.rows.device, torch.long)
        return logits[0, :S][rows]                               # (K, V): padded rows never reach the sampler
