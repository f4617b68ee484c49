"""The paged KV cache: one pool of K/V blocks shared by every sequence, and attention through it.

Memory layout (vLLM's flash-attention layout, ``vllm/v1/attention/backends/flash_attn.py``)::

    kv     (num_kv_layers, 2, num_blocks, block_size, n_kv_heads, head_dim)   K and V side by side
    k, v   views kv[:, 0], kv[:, 1]: (num_kv_layers, num_blocks, block_size, n_kv_heads, head_dim)
    slot   = block_id * block_size + offset        a token's row in k[layer].view(-1, nkv, hd)

(vLLM keeps the 2 on the outside of the same tensor, ``(2, num_blocks, block_size, nkv, hd)`` per
layer; one tensor lets a layer write K and V with one scatter and read them with one gather.)

The model runs on a *flattened batch* built by the engine's runner
(``minfer/engine/runner.py``, the only place a batch is flattened): the tokens
of several sequences side by side in ``input_ids (1, N)``. ``PagedBatch`` says
which tokens belong to which sequence and where their K/V go::

    seq A: prefill of 3 tokens at positions 0..2   seq B: decode 1 token at position 5
    input_ids     [a0 a1 a2 | b5]                  query_lens [3, 1]   seq_lens [3, 6]
    slot_mapping  [ 8  9 10 | 21]                  logits_indices [2, 3]
    block_tables  [[2, 0],                         (S, max blocks): rows of the persistent
                   [0, 5]]                         table; A's 0 is padding (read, masked)
                                                   (block_size 4: b5 -> block 5, offset 1)

Each layer calls ``update`` (write the N new keys/values at their slots, one
scatter for the whole batch) and ``attend``, which runs attention through the
block tables in one of four ways, all tested equal to contiguous attention.
The index tensors they need are built once per forward (``set_batch``), by
vectorized ops over the batch, and reused by every layer:

* ``"split"`` (the engine's default): every decode in ONE backend call per
  layer, each prefill chunk in its own call. The decodes are padded to the
  longest context among them (padded keys get position -1, which the mask
  hides). Padding everything, prefill chunks included, to one batch would waste
  most of the work when a step mixes 31 decodes with one 512-token chunk (97%
  of the padded scores are padding), so chunks stay apart: one call over their
  own context, and a chunk that starts at position 0 needs no gather at all
  (its keys are this forward's). vLLM's old CPU backend split the same way
  (``vllm/attention/backends/torch_sdpa.py``); its GPU backends use a
  variable-length FlashAttention kernel (``cu_seqlens``) instead. One call per
  layer is also what a captured CUDA graph or a paged-decode kernel needs.
* ``"bucketed"``: as split, but the decodes are grouped by context length
  (buckets grow by sqrt(2), < 30% padding each) and each group is one call:
  less padding, more calls. minfer's default before issue 13; kept to measure
  the trade (``minfer bench serve --baselines bucketed``; see docs/architecture.md).
* ``"gather"``: copy every sequence's K/V into one padded contiguous tensor and
  call the attention backend once. Simplest; costs one copy of the context.
* ``"online"``: walk the block table one block at a time and fold each block
  into FlashAttention's online softmax; the contiguous copy is never built.
  This is the PagedAttention kernel's loop (vLLM: ``csrc/attention/paged_attention_v1.cu``).

``decode_kernel="cpu"`` runs split mode's decode group through a C++ kernel that walks
the block tables and reads the pool in place (``minfer/kernels/cpu_paged_decode.py``),
instead of the gather + SDPA of the plain path; ``"triton"`` through the Triton kernel
(``minfer/kernels/paged_decode.py``). Both kernels are tested against the gathered
reference, and the engine on the C++ one against the plain path and the oracle.

``kv_cache_dtype="int8" | "fp8"`` stores pages quantized, with one fp32 scale
per token and head (the rule of ``kv/quantized.py``), dequantized as they are
read; vLLM: ``kv_cache_dtype="fp8"``. Layers that share K/V (cross-layer
sharing) share pages: the pool has ``num_kv_layers`` layers, not one per layer.
The bookkeeping (block tables, prefix caching, copy-on-write) is in ``block_pool.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from minfer.attention.flash import online_softmax_update
from minfer.attention.mask import allowed
from minfer.attention.sdpa import sdpa, sdpa_attention
from minfer.devices import to_device
from minfer.kv.base import KVView
from minfer.kv.quantized import QMAX, STORAGE, dequantize_kv, quantize_kv
from minfer.validation import KV_CACHE_DTYPES

ATTENTION_MODES = ("split", "bucketed", "gather", "online")
DECODE_KERNELS = ("auto", "torch", "cpu", "triton")


def resolve_decode_kernel(name: str, device, dtype, kv_cache_dtype: str = "auto", attention_mode: str = "split"):
    """``decode_kernel`` -> (the name in use, the kernel function or None for the plain torch path).

    "auto": the C++ kernel on a CPU in float32 with unquantized pages in split mode, when it
    builds (``minfer.kernels.cpu_paged_decode.available``); the torch path otherwise.
    "cpu" / "triton" ask for a kernel and fail with the reason when it cannot run here.
    """
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {name!r}")
    device = torch.device(device)
    fits = kv_cache_dtype == "auto" and attention_mode in ("split", "bucketed")
    if name == "auto":
        if not (fits and device.type == "cpu" and dtype == torch.float32):
            return "torch", None
        from minfer.kernels import cpu_paged_decode
        if cpu_paged_decode.available():
            return "cpu", cpu_paged_decode.cpu_paged_decode_attention
        return "torch", None
    if name == "torch":
        return name, None
    if not fits:
        raise ValueError(f"decode_kernel={name!r} reads unquantized pages in split/bucketed mode; got "
                         f"kv_cache_dtype={kv_cache_dtype!r}, attention_mode={attention_mode!r}")
    if name == "cpu":
        from minfer.kernels import cpu_paged_decode
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError(f"decode_kernel='cpu' runs float32 on the CPU; got {dtype} on {device}")
        if not cpu_paged_decode.available():
            raise RuntimeError(f"decode_kernel='cpu': the kernel could not be built "
                               f"({cpu_paged_decode.why_unavailable()}); it needs g++ and ninja")
        return name, cpu_paged_decode.cpu_paged_decode_attention
    from minfer.kernels import paged_decode
    paged_decode._require_triton()
    return name, paged_decode.paged_decode_attention


@dataclass
class PagedBatch:
    """Attention metadata of one forward over a flattened batch of N tokens from S sequences.

    Built by the runner's ``prepare_batch`` with vectorized ops (no per-sequence tensors).
    The two length vectors stay on the host: the attention plan reads their maxima to size
    its padding, which on a GPU must not wait for the device.
    """

    query_lens: torch.Tensor            # (S,) long, host: tokens of each sequence in this forward
    seq_lens: torch.Tensor              # (S,) long, host: context length of each after this forward
    block_tables: torch.Tensor          # (S, max blocks) long: physical block ids (rows of the persistent table)
    slot_mapping: torch.Tensor          # (N,) long: where each new token's K/V is written
    logits_indices: torch.Tensor        # (S,) long: each sequence's last token in the batch
    positions: torch.Tensor             # (1, N) long: absolute position of each token

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


@torch.library.custom_op("minfer::write_kv_rows", mutates_args=("kv",))
def write_kv_rows(kv: torch.Tensor, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """kv[layer] rows at ``slots`` = ``rows`` (2, N, nkv, hd): the paged cache's write, as one custom op.

    The same ``index_copy_`` as the eager path, declared to torch.compile as an op that
    mutates ``kv`` in place. Traced as plain torch ops, the write into one layer of the
    pool is functionalized into a copy of the whole pool per layer (405 MB per step for
    SmolLM2's default pool, measured: 2.5 s per compiled step instead of ~0.1 s). vLLM hides
    its KV write and attention from the compiler the same way
    (``torch.ops.vllm.unified_attention_with_output``, ``vllm/attention/layer.py``).
    """
    nkv, hd = rows.shape[2], rows.shape[3]
    kv[layer].view(2, -1, nkv, hd).index_copy_(1, slots, rows)


@write_kv_rows.register_fake
def _(kv, layer, slots, rows) -> None:
    return None


@dataclass
class _Group:
    """One backend call of the split mode: some sequences' queries and the keys they read."""

    rows: slice | torch.Tensor | None  # rows of the flattened batch whose queries belong here: a range
                                  # (a view, no copy) or (G * T,) indices; None: all
    q_pos: torch.Tensor           # (G, T) query positions
    k_pos: torch.Tensor           # (G, W) key positions, -1 = padding; W = blocks read * block_size
    k_blocks: torch.Tensor | None # (G * W / block_size,) blocks to gather; None = the keys are this forward's own
    k_rows: torch.Tensor | None = field(default=None, kw_only=True)   # their _kv_rows, once per forward
    num_seqs: int
    fresh: slice | None = None    # a prefill from position 0: its columns in this forward's k/v
    sdpa_mask: torch.Tensor | None = None   # (G, 1, T, S) for the SDPA fast path (None: all / causal)
    tables: torch.Tensor | None = None      # a decode group's (G, blocks) block-table rows, for a decode kernel
    lens: torch.Tensor | None = None        # a decode group's (G,) context lengths, on the device
    whole: bool = False           # the group is the whole batch, in order: no query gather or output scatter
    static: bool = False          # built by set_static_batch: sdpa_mask already applies the sliding window


def _as_range(rows: torch.Tensor, device) -> slice | torch.Tensor:
    """Host row indices (G,) -> a slice when they are consecutive (the usual case: the scheduler puts
    the running decodes first), so that the group's queries are a view and its output one copy."""
    if len(rows) == 1 or bool((rows.diff() == 1).all()):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return to_device(rows, device)


class PagedKVCache:
    """K/V storage in blocks, plus attention through block tables (see the module docstring)."""

    def __init__(self, cfg, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 device="cpu", attention_mode: str = "split", kv_cache_dtype: str = "auto",
                 decode_kernel: str = "torch"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {attention_mode!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES or (kv_cache_dtype != "auto" and STORAGE[kv_cache_dtype] is None):
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (and supported by this torch), "
                             f"got {kv_cache_dtype!r}")
        self.cfg, self.dtype = cfg, dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.attention_mode, self.kv_cache_dtype = attention_mode, kv_cache_dtype
        self.quantized = kv_cache_dtype != "auto"
        self.decode_kernel, self._kernel = resolve_decode_kernel(decode_kernel, device, dtype, kv_cache_dtype,
                                                                 attention_mode)
        L, nkv, hd = cfg.num_kv_layers, cfg.num_key_value_heads, cfg.head_dim
        shape = (L, num_blocks, block_size, nkv, hd)
        store = STORAGE[kv_cache_dtype] if self.quantized else dtype
        # K and V in one tensor, so that a layer's keys and values are written and gathered by one
        # op each (at batch-1 decode the per-op overhead, not the bytes, is what paging costs).
        self.kv = torch.zeros((L, 2, *shape[1:]), device=device).to(store)   # (L, 2, num_blocks, bs, nkv, hd)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]          # views: (L, num_blocks, block_size, nkv, hd)
        if self.quantized:                                      # one fp32 scale per token and head
            self.k_scale = torch.ones(L, num_blocks, block_size, nkv, 1, device=device)
            self.v_scale = torch.ones_like(self.k_scale)
        self.meta: PagedBatch | None = None
        self._static = False       # the installed plan is set_static_batch's
        self._gather_buf: torch.Tensor | None = None   # (rows, block values) reused by every layer's gather

    # ------------------------------------------------------------ sizes
    @staticmethod
    def bytes_per_block(cfg, block_size: int, dtype=torch.float32, kv_cache_dtype: str = "auto") -> int:
        """K and V bytes of one block across all KV layers (values, plus scales when quantized)."""
        per_head = cfg.head_dim * torch.empty((), dtype=dtype).element_size()
        if kv_cache_dtype in QMAX:
            per_head = cfg.head_dim * 1 + 4
        return 2 * cfg.num_kv_layers * block_size * cfg.num_key_value_heads * per_head

    @classmethod
    def num_blocks_for_memory(cls, cfg, memory_bytes: float, block_size: int, dtype=torch.float32,
                              kv_cache_dtype: str = "auto") -> int:
        """How many blocks fit in a memory budget."""
        return int(memory_bytes // cls.bytes_per_block(cfg, block_size, dtype, kv_cache_dtype))

    def nbytes(self) -> int:
        scales = self.k_scale.nbytes + self.v_scale.nbytes if self.quantized else 0
        return self.k.nbytes + self.v.nbytes + scales

    # ------------------------------------------------------------ reading and writing
    def _kv_rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """Block ids (M,) -> (2M,) rows of ``kv[layer].view(2 * num_blocks, -1)``: K's blocks, then V's."""
        return torch.cat((blocks, blocks + self.num_blocks))

    def _blocks(self, layer: int, blocks: torch.Tensor, rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks ``blocks`` (M,) -> two (M * block_size, nkv, hd) tensors in the compute dtype.

        Reads go block by block, as PagedAttention reads them: each block is one contiguous run of
        block_size * nkv * hd values, so the gather copies M long runs instead of M * block_size
        short rows (3x faster on a 2-core CPU for a 32-sequence decode: 1.9 vs 6.0 ms per layer).
        The rows past a sequence's length are read too and hidden by the mask (key position -1).
        ``rows``: ``_kv_rows(blocks)``, when the plan computed it once for every layer.
        """
        nkv, hd = self.k.shape[3], self.k.shape[4]
        if not self.quantized:                   # K and V in one gather of 2M block rows
            # kv[layer] viewed as 2 * num_blocks rows of one block each: K's block b is row b and
            # V's is row num_blocks + b. A gather along dim 0 of a 2-D tensor is a memcpy per row
            # and runs on every thread; the same gather along dim 1 of the 5-D view ran 2x slower
            # on one thread (2.3 vs 1.2 ms per layer, 32 decodes at 530 keys, 2-core CPU).
            rows = self._kv_rows(blocks) if rows is None else rows
            both = self._gather(self.kv[layer].view(2 * self.num_blocks, -1), rows)      # (2M, bs*nkv*hd)
            return both.view(2, -1, nkv, hd).unbind(0)                                # (M * bs, nkv, hd) each
        out = []
        for store, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            q = store[layer].view(torch.int8).index_select(0, blocks).flatten(0, 1)   # (M * bs, nkv, hd)
            s = scales[layer].index_select(0, blocks).flatten(0, 1)                   # (M * bs, nkv, 1)
            out.append(dequantize_kv(q.view(store.dtype), s, self.dtype))
        return out[0], out[1]

    def _gather(self, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``src.index_select(0, rows)``, written into one buffer that every layer reuses (eager path).

        A layer's gathered K/V is read by its attention call and dead before the next layer
        gathers, so one buffer, grown to the largest gather seen, serves them all. A fresh
        tensor per layer (24 MB at 32 decodes of 530 keys) costs page faults whenever the
        allocator hands memory back to the OS and takes it again. The static path (CUDA
        graphs, torch.compile) allocates as usual: its memory is the graph pool's.
        """
        if self._static or torch.compiler.is_compiling():
            return src.index_select(0, rows)
        n = rows.shape[0]
        buf = self._gather_buf
        if buf is None or buf.shape[0] < n or buf.shape[1] != src.shape[1] or buf.dtype != src.dtype:
            buf = self._gather_buf = torch.empty(n, src.shape[1], dtype=src.dtype, device=src.device)
        return torch.index_select(src, 0, rows, out=buf[:n])

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write: for each (src, dst), in order, block dst becomes a copy of block src (all layers)."""
        for src, dst in pairs:
            self.kv[:, :, dst] = self.kv[:, :, src]
            if self.quantized:
                for t in (self.k_scale, self.v_scale):
                    t[:, dst] = t[:, src]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVView:
        """Write k, v (1, nkv, N, hd) at ``meta.slot_mapping``; returns them (dequantized if stored so)."""
        meta = self._need_meta(positions)
        nkv, hd = k.shape[1], k.shape[3]
        if not self.quantized:             # both in one scatter: (2, nkv, N, hd) -> rows (2, N, nkv, hd)
            rows = torch.stack((k[0], v[0])).transpose(1, 2)
            if self._static and torch.compiler.is_compiling():   # one opaque in-place op (write_kv_rows)
                write_kv_rows(self.kv, layer, meta.slot_mapping, rows)
            else:
                self.kv[layer].view(2, -1, nkv, hd).index_copy_(1, meta.slot_mapping, rows)
            return KVView(k, v, positions)
        out = []
        for store, x, scales in ((self.k, k, getattr(self, "k_scale", None)), (self.v, v, getattr(self, "v_scale", None))):
            rows = x[0].transpose(0, 1)                                            # (N, nkv, hd)
            # write through an int8 view: not every build has fp8 index_copy
            q, s = quantize_kv(rows, self.kv_cache_dtype)
            store[layer].view(torch.int8).view(-1, nkv, hd).index_copy_(0, meta.slot_mapping, q.view(torch.int8))
            scales[layer].view(-1, nkv, 1).index_copy_(0, meta.slot_mapping, s)
            x = dequantize_kv(q, s, x.dtype).transpose(0, 1)[None]                 # what later reads will see
            out.append(x)
        return KVView(out[0], out[1], positions)

    def _need_meta(self, positions: torch.Tensor) -> PagedBatch:
        meta = self.meta
        if meta is None:
            raise ValueError("PagedKVCache: call set_batch(PagedBatch) before the forward")
        if positions.dim() != 2 or positions.shape[0] != 1 or positions.shape[1] != meta.num_tokens:
            raise ValueError(f"PagedKVCache expects a flattened batch (1, {meta.num_tokens}) as set by "
                             f"set_batch; got positions of shape {tuple(positions.shape)}")
        return meta

    # ------------------------------------------------------------ per-forward plans
    def set_batch(self, meta: PagedBatch) -> None:
        """Install the metadata of the next forward; precompute the index tensors every layer reuses."""
        self.meta, self._static = meta, False
        device = self.k.device
        self._tables = meta.block_tables.to(device)                               # (S, max blocks)
        if self.attention_mode in ("split", "bucketed"):
            self._plan_split(meta, self.block_size, device)
        else:
            self._plan_padded(meta, self.block_size, device)

    def _plan_padded(self, meta: PagedBatch, bs: int, device) -> None:
        """gather / online: every sequence padded to the longest query and the longest context."""
        T = int(meta.query_lens.max())
        qlens = to_device(meta.query_lens, device)
        starts = qlens.cumsum(0) - qlens                                            # (S,) first row of each
        t = torch.arange(T, device=device)
        self._q_valid = t[None] < qlens[:, None]                                    # (S, T)
        self._q_index = (starts[:, None] + t[None]).masked_fill(~self._q_valid, 0)
        self._q_pos = meta.positions[0][self._q_index].masked_fill(~self._q_valid, -1)  # (S, T), -1 sees nothing
        self._seq_lens = to_device(meta.seq_lens, device)
        self._nblk = -(-int(meta.seq_lens.max()) // bs)                              # blocks of the longest
        pos = torch.arange(self._nblk * bs, device=device)
        self._k_pos = torch.where(pos[None] < self._seq_lens[:, None], pos[None], -1)   # (S, W), -1 = padding

    def _plan_split(self, meta: PagedBatch, bs: int, device) -> None:
        """split: every decode in one group, each prefill chunk in its own ("bucketed": decodes by length)."""
        self.groups: list[_Group] = []
        qlens, slens = meta.query_lens, meta.seq_lens                               # (S,) host
        starts = qlens.cumsum(0) - qlens                                            # (S,) first row of each
        decode = qlens == 1
        only_decodes = meta.num_tokens == len(qlens)
        for s in [] if only_decodes else (~decode).nonzero()[:, 0].tolist():   # prefill chunks, one by one
            start, slen = int(starts[s]), int(slens[s])
            first = slen - int(qlens[s])                                            # the chunk's first position
            rows = slice(start, start + slen - first)                               # a chunk's rows are a range
            q_pos = torch.arange(first, slen, device=device)[None]                 # (1, T)
            if first == 0:                                                          # whole context in this forward
                self.groups.append(_Group(rows, q_pos, q_pos, None, 1, slice(start, start + slen)))
            else:                                                                   # read its blocks
                nblk = -(-slen // bs)
                pos = torch.arange(nblk * bs, device=device)[None]                  # (1, W)
                k_pos = pos.masked_fill(pos >= slen, -1)
                self.groups.append(_Group(rows, q_pos, k_pos, self._tables[s, :nblk], 1,
                                          sdpa_mask=allowed(q_pos, k_pos)[:, None]))
        dec = torch.arange(len(qlens)) if only_decodes else decode.nonzero()[:, 0]  # (D,) host
        if len(dec) and self.attention_mode == "split":        # one backend call for every decode
            self.groups.append(self._decode_group(dec, slens, starts, bs, device, whole_batch=only_decodes))
        elif len(dec):
            # "bucketed" (the engine's old default): decodes grouped by context length in steps of
            # sqrt(2), so that padding wastes < 30% of a group, at the price of one call per bucket.
            bucket = (2 * torch.log2(slens[dec].double())).long()
            for b in bucket.unique().tolist():
                self.groups.append(self._decode_group(dec[bucket == b], slens, starts, bs, device, False))
        if len(self.groups) == 1 and (self.groups[0].num_seqs == 1 or only_decodes):
            self.groups[0].whole = True        # one sequence, or decodes only in one group (rows in order)
        self._index_rows()

    def _index_rows(self) -> None:
        """Each group's gather rows, computed once here rather than in every layer."""
        for g in self.groups:
            if g.k_blocks is not None and not self.quantized and not self._kernel_reads(g):
                g.k_rows = self._kv_rows(g.k_blocks)

    def _kernel_reads(self, g: _Group) -> bool:
        """Whether a decode kernel, not gather + backend, runs this group (eager decode groups only)."""
        return self._kernel is not None and g.lens is not None and not self._static

    def set_static_batch(self, meta: PagedBatch) -> None:
        """The plan of a decode-only batch with fixed shapes: the static path of CUDA graphs and torch.compile.

        ``_decode_group`` pads the decodes to the longest context *of this step*, which it
        reads on the host (``int(sl.max())``); a captured graph cannot do that, because its
        shapes are frozen at capture and a host read inside a capture is an error. Here every
        row is one query at position ``seq_lens - 1`` over ALL the keys its block-table row
        can address, ``W = block_tables.shape[1] * block_size`` of them, and the keys past
        its context are masked (position -1)::

            seq_lens [3, 6]  block_size 4  block_tables (2, 2) -> W = 8
            k_pos    [[0 1 2 -1 -1 -1 -1 -1],       q_pos [[2],
                      [0 1 2  3  4  5 -1 -1]]              [5]]

        Every tensor comes from ``meta``'s device tensors by device ops: no ``.item()``,
        ``int()`` or ``.max()`` on the host. ``meta.seq_lens`` is therefore a device tensor
        here (the eager plan keeps it on the host). One group, the whole batch, in order:
        ``_attend_split`` runs it as one backend call per layer. The sliding window goes into
        the mask, so the SDPA fast path serves windowed models too. vLLM builds the same
        fixed-shape metadata for its captured decode (``CommonAttentionMetadata`` with
        ``max_seq_len`` fixed; ``vllm/v1/worker/gpu_model_runner.py``).
        """
        self.meta, self._static = meta, True
        self._tables = meta.block_tables                                            # (S, cols) device
        S, cols = meta.block_tables.shape
        pos = torch.arange(cols * self.block_size, device=self._tables.device)      # (W,)
        sl = meta.seq_lens                                                          # (S,) device
        k_pos = torch.where(pos[None] < sl[:, None], pos[None], -1)                 # (S, W), -1 = padding
        q_pos = (sl - 1)[:, None]                                                   # (S, 1)
        mask = allowed(q_pos, k_pos, self.cfg.sliding_window)[:, None]              # (S, 1, 1, W)
        self.groups = [_Group(None, q_pos, k_pos, self._tables.flatten(), S, sdpa_mask=mask, whole=True,
                              static=True)]              # every block of every row, masked past the context
        self._index_rows()

    def _decode_group(self, idx: torch.Tensor, slens, starts, bs: int, device, whole_batch: bool) -> _Group:
        """Decodes ``idx`` (G,) in one group, padded to the blocks of the longest context (key position -1 = padding)."""
        sl = slens if whole_batch else slens[idx]                                   # (G,) host
        nblk = -(-int(sl.max()) // bs)
        width = nblk * bs
        sl_dev = to_device(sl, device)
        pos = torch.arange(width, device=device)
        k_pos = torch.where(pos[None] < sl_dev[:, None], pos[None], -1)            # (G, W)
        tables = self._tables if whole_batch else self._tables[to_device(idx, device)]     # (G, max blocks)
        q_pos = (sl_dev - 1)[:, None]                                               # (G, 1)
        padded = int(sl.min()) < width and self._kernel is None
        mask = allowed(q_pos, k_pos)[:, None] if padded else None                   # (G, 1, 1, W); none if unpadded
        rows = None if whole_batch else _as_range(starts[idx], device)              # whole: rows are 0..S-1
        return _Group(rows, q_pos, k_pos, tables[:, :nblk].flatten(), len(idx), sdpa_mask=mask,
                      tables=tables[:, :nblk], lens=sl_dev)

    # ------------------------------------------------------------ attention
    def attend(self, layer: int, q: torch.Tensor, view: KVView, positions: torch.Tensor, backend,
               window: int | None = None) -> torch.Tensor:
        """Attention of the N queries q (1, nh, N, hd) over each one's sequence -> (1, nh, N, hd)."""
        self._need_meta(positions)
        if self._static or self.attention_mode in ("split", "bucketed"):
            return self._attend_split(layer, q, view, backend, window)
        S = self._q_index.shape[0]
        qp = q[0].transpose(0, 1)[self._q_index].transpose(1, 2)                    # (S, nh, T, hd)
        if self.attention_mode == "gather":
            out = self._attend_gather(layer, qp, self._q_pos, backend, window)
        else:
            out = self._attend_online(layer, qp, self._q_pos, window)
        return out.transpose(1, 2)[self._q_valid].transpose(0, 1)[None] if S > 1 else out  # (1, nh, N, hd)

    def _attend_split(self, layer, q, view, backend, window):
        """One backend call per group (see ``_plan_split``)."""
        nkv, hd = self.k.shape[3], self.k.shape[4]
        out = None if self.groups[0].whole else torch.empty_like(q)
        for g in self.groups:
            G = g.num_seqs
            if self._kernel_reads(g) and backend is sdpa_attention:   # the pool read in place, one call
                qd = (q[0] if g.whole else q[0][:, g.rows]).transpose(0, 1)          # (G, nh, hd)
                o = self._kernel(qd, self.k[layer], self.v[layer], g.tables, g.lens, window=window)
                o = o.transpose(0, 1)                                                # (nh, G, hd)
                if g.whole:
                    return o[None]                                                   # (1, nh, N, hd)
                out[0][:, g.rows] = o
                continue
            if G == 1 and g.whole:                                                   # one sequence: as it is
                qg = q                                                               # (1, nh, T, hd)
            else:
                qg = (q[0] if g.whole else q[0][:, g.rows]).reshape(q.shape[1], G, -1, hd).transpose(0, 1)  # (G, nh, T, hd)
            if g.k_blocks is None:
                keys, values = view.keys[:, :, g.fresh], view.values[:, :, g.fresh]  # (1, nkv, T, hd)
            else:
                keys, values = self._blocks(layer, g.k_blocks, g.k_rows)             # (G * W, nkv, hd) each
                keys = keys.view(G, -1, nkv, hd).transpose(1, 2)                    # (G, nkv, W, hd)
                values = values.view(G, -1, nkv, hd).transpose(1, 2)
            if backend is sdpa_attention and (window is None or g.static):
                # The SDPA backend's own logic, with the mask computed once per forward (_plan_split).
                o = sdpa(qg, keys, values, is_causal=True) if g.fresh is not None else \
                    sdpa(qg, keys, values, attn_mask=g.sdpa_mask)
            else:
                o = backend(qg, keys, values, g.q_pos, g.k_pos, window=window)       # (G, nh, T, hd)
            if g.whole:
                return o if G == 1 else o.transpose(0, 1).reshape(q.shape[1], -1, hd)[None]  # (1, nh, N, hd)
            out[0][:, g.rows] = o.transpose(0, 1).reshape(q.shape[1], -1, hd)
        return out

    def _attend_gather(self, layer, q, q_pos, backend, window):
        """Gather each sequence's blocks into (S, nkv, W, hd), then call the attention backend."""
        S = self._k_pos.shape[0]
        nkv, hd = self.k.shape[3], self.k.shape[4]
        keys, values = self._blocks(layer, self._tables[:, :self._nblk].flatten())  # (S * W, nkv, hd)
        keys = keys.view(S, -1, nkv, hd).transpose(1, 2).to(q.dtype)               # (S, nkv, W, hd)
        values = values.view(S, -1, nkv, hd).transpose(1, 2).to(q.dtype)
        return backend(q, keys, values, q_pos, self._k_pos, window=window)

    def _attend_online(self, layer, q, q_pos, window):
        """PagedAttention's loop: for each logical block j, fold block_tables[:, j] into the softmax."""
        S, nh, T, hd = q.shape
        nkv, bs = self.k.shape[3], self.block_size
        g = nh // nkv
        scale = 1.0 / math.sqrt(hd)
        qg = q.float().reshape(S, nkv, g, T, hd)                                   # query heads grouped per K/V head
        m = torch.full((S, nkv, g, T, 1), float("-inf"), device=q.device)          # running max
        l = torch.zeros_like(m)                                                     # running sum
        acc = torch.zeros_like(qg)                                                  # unnormalised output
        offsets = torch.arange(bs, device=q.device)
        for j in range(self._nblk):
            block_pos = j * bs + offsets                                            # (bs,)
            k_pos = torch.where(block_pos[None] < self._seq_lens[:, None], block_pos[None], -1)   # (S, bs)
            visible = allowed(q_pos, k_pos, window)                                 # (S, T, bs)
            if not bool(visible.any()):                                             # e.g. outside the window
                continue
            kb, vb = self._blocks(layer, self._tables[:, j])                        # (S * bs, nkv, hd)
            kb = kb.float().view(S, bs, nkv, hd).permute(0, 2, 1, 3)[:, :, None]    # (S, nkv, 1, bs, hd)
            vb = vb.float().view(S, bs, nkv, hd).permute(0, 2, 1, 3)[:, :, None]
            scores = (qg @ kb.transpose(-1, -2)) * scale                            # (S, nkv, g, T, bs)
            scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, vb)
        out = acc / l.clamp_min(torch.finfo(l.dtype).tiny)                          # rows with no key stay 0
        return out.reshape(S, nh, T, hd).to(q.dtype)
