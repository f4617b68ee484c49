"""The paged KV cache's storage: one pool of K/V blocks shared by every sequence, and its write.

    kv     (num_kv_layers, 2, num_blocks, block_size, n_kv_heads, head_dim)   (vLLM's flash-attn layout)
    slot   = block_id * block_size + offset

``update`` writes a flattened batch's K/V at their slots (vLLM: ``reshape_and_cache``); ``attend``
hands the queries to ``minfer/attention/paged.py``. Diagrams: docs/kv-and-attention.md.
"""
from dataclasses import dataclass

import torch

from minfer.attention import BACKENDS
from minfer.attention.paged import make_paged_attention
from minfer.kv.base import KVView
from minfer.kv.coordinator import kv_cache_groups
from minfer.kv.quantized import QMAX, STORAGE, dequantize_kv, quantize_kv
from minfer.validation import KV_CACHE_DTYPES


@dataclass
class PagedBatch:
    """Attention metadata of one forward over a flattened batch of N tokens from S sequences
    (``prepare_batch``). The length vectors stay on the host: the plan reads their maxima."""

    query_lens: torch.Tensor            # (S,) long, host: tokens of each sequence in this forward
    seq_lens: torch.Tensor              # (S,) long, host: context length of each after this forward
    block_tables: torch.Tensor          # (S, max blocks) long: physical block ids (rows of the persistent table)
    slot_mapping: torch.Tensor          # (N,) long: where each new token's K/V is written
    logits_indices: torch.Tensor        # (S,) long: each sequence's last token in the batch
    positions: torch.Tensor             # (1, N) long: absolute position of each token
    groups: list | None = None          # local/global: one per KV group (kv/coordinator.py); this is 0's

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())


@torch.library.custom_op("minfer::write_kv_rows", mutates_args=("kv",))
def write_kv_rows(kv: torch.Tensor, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """kv[layer] rows at ``slots`` = ``rows`` (2, N, nkv, hd), an in-place custom op for torch.compile
    (vLLM: ``torch.ops.vllm.unified_attention_with_output``). Why: docs/kv-and-attention.md."""
    nkv, hd = rows.shape[2], rows.shape[3]
    kv[layer].view(2, -1, nkv, hd).index_copy_(1, slots, rows)


@write_kv_rows.register_fake
def _(kv, layer, slots, rows) -> None:
    return None


class PagedKVCache:
    """K/V storage in blocks; attention is its backend's (``self.attn``, ``make_paged_attention``):
    ``attention`` the dense backend's name or a callable, ``attention_mode`` "split" or "online"."""

    def __init__(self, cfg, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu",
                 attention="sdpa", attention_mode: str = "split", kv_cache_dtype: str = "auto",
                 decode_kernel: str = "torch"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if kv_cache_dtype not in KV_CACHE_DTYPES or (kv_cache_dtype != "auto" and STORAGE[kv_cache_dtype] is None):
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (and supported by this torch), "
                             f"got {kv_cache_dtype!r}")
        self.cfg, self.dtype = cfg, dtype
        groups = kv_cache_groups(cfg)          # one group unless local and global layers mix
        self.where = {layer: (g, j) for g, (_, layers) in enumerate(groups) for j, layer in enumerate(layers)}
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_cache_dtype, self.quantized = kv_cache_dtype, kv_cache_dtype != "auto"
        L, nkv, hd = len(groups[0][1]), cfg.num_key_value_heads, cfg.head_dim    # layers of one group
        store = STORAGE[kv_cache_dtype] if self.quantized else dtype
        # K and V in one tensor, so that a layer's keys and values are written and gathered by one
        # op each (at batch-1 decode the per-op overhead, not the bytes, is what paging costs).
        self.kv = torch.zeros((L, 2, num_blocks, block_size, nkv, hd), device=device).to(store)
        self.k, self.v = self.kv[:, 0], self.kv[:, 1]          # views: (L, num_blocks, block_size, nkv, hd)
        if self.quantized:                                      # one fp32 scale per token and head
            self.scales = torch.ones(L, 2, num_blocks, block_size, nkv, 1, device=device)
        self.meta: PagedBatch | None = None
        self.metas: list[PagedBatch] = []
        self._gather_buf: torch.Tensor | None = None   # (rows, block values) reused by every layer's gather
        self.attns = [make_paged_attention(self, attention, attention_mode, decode_kernel) for _ in groups]
        self.attn = self.attns[0]
        self.attention_mode, self.decode_kernel = attention_mode, self.attn.decode_kernel

    @staticmethod
    def bytes_per_block(cfg, block_size: int, dtype=torch.float32, kv_cache_dtype: str = "auto") -> int:
        """K and V bytes of one block across the layers of a KV group (values, plus scales when quantized)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_head = cfg.head_dim + 4 if kv_cache_dtype in QMAX else cfg.head_dim * itemsize   # + a scale
        return 2 * len(kv_cache_groups(cfg)[0][1]) * block_size * cfg.num_key_value_heads * per_head

    @classmethod
    def num_blocks_for_memory(cls, cfg, memory_bytes: float, block_size: int, dtype=torch.float32,
                              kv_cache_dtype: str = "auto") -> int:
        """How many blocks fit in a memory budget."""
        return int(memory_bytes // cls.bytes_per_block(cfg, block_size, dtype, kv_cache_dtype))

    def nbytes(self) -> int:
        return self.kv.nbytes + (self.scales.nbytes if self.quantized else 0)

    def kv_rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """Block ids (M,) -> (2M,) rows of ``kv[layer].view(2 * num_blocks, -1)``: K's blocks, then V's."""
        return torch.cat((blocks, blocks + self.num_blocks))

    def read_blocks(self, layer: int, blocks: torch.Tensor, rows: torch.Tensor | None = None,
                    reuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks ``blocks`` (M,) -> two (M * block_size, nkv, hd) in the compute dtype.
        ``rows``: ``kv_rows(blocks)``; ``reuse``: the layers' shared buffer (docs/kv-and-attention.md)."""
        nkv, hd = self.k.shape[3], self.k.shape[4]
        if not self.quantized:                   # K and V in one gather of 2M block rows
            rows = self.kv_rows(blocks) if rows is None else rows
            both = self._gather(self.kv[layer].view(2 * self.num_blocks, -1), rows, reuse)  # (2M, bs*nkv*hd)
            return both.view(2, -1, nkv, hd).unbind(0)                                # (M * bs, nkv, hd) each
        q = self.kv[layer].view(torch.int8).index_select(1, blocks).flatten(1, 2)    # (2, M * bs, nkv, hd)
        s = self.scales[layer].index_select(1, blocks).flatten(1, 2)                 # (2, M * bs, nkv, 1)
        return dequantize_kv(q.view(self.kv.dtype), s, self.dtype).unbind(0)

    def _gather(self, src: torch.Tensor, rows: torch.Tensor, reuse: bool) -> torch.Tensor:
        """``src.index_select(0, rows)`` into one buffer every layer reuses (eager path)."""
        if not reuse or torch.compiler.is_compiling():
            return src.index_select(0, rows)
        n = rows.shape[0]
        buf = self._gather_buf
        if buf is None or buf.shape[0] < n or buf.shape[1] != src.shape[1] or buf.dtype != src.dtype:
            buf = self._gather_buf = torch.empty(n, src.shape[1], dtype=src.dtype, device=src.device)
        return torch.index_select(src, 0, rows, out=buf[:n])

    def dequantized(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool of one layer as (num_blocks, block_size, nkv, hd) K and V in the compute dtype."""
        if not self.quantized:
            return self.k[layer], self.v[layer]
        return dequantize_kv(self.kv[layer], self.scales[layer], self.dtype).unbind(0)

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write: for each (src, dst), in order, block dst becomes a copy of block src (all layers)."""
        for src, dst in pairs:
            self.kv[:, :, dst] = self.kv[:, :, src]
            if self.quantized:
                self.scales[:, :, dst] = self.scales[:, :, src]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVView:
        """Write k, v (1, nkv, N, hd) at ``meta.slot_mapping``; returns them (dequantized if stored so)."""
        self._need_meta(positions)
        group, layer = self.where[layer]                   # the layer's KV group, its slot in a block
        meta = self.metas[group]
        nkv, hd = k.shape[1], k.shape[3]
        rows = torch.stack((k[0], v[0])).transpose(1, 2)  # K and V in one scatter: rows (2, N, nkv, hd)
        if not self.quantized:
            if torch.compiler.is_compiling():                  # one opaque in-place op (write_kv_rows)
                write_kv_rows(self.kv, layer, meta.slot_mapping, rows)
            else:
                self.kv[layer].view(2, -1, nkv, hd).index_copy_(1, meta.slot_mapping, rows)
            return KVView(k, v, positions)
        q, s = quantize_kv(rows, self.kv_cache_dtype)      # written through an int8 view: not every build
        pages = self.kv[layer].view(torch.int8).view(2, -1, nkv, hd)                  # has fp8 index_copy
        pages.index_copy_(1, meta.slot_mapping, q.view(torch.int8))
        self.scales[layer].view(2, -1, nkv, 1).index_copy_(1, meta.slot_mapping, s)
        out = dequantize_kv(q, s, k.dtype).transpose(1, 2)                   # (2, nkv, N, hd): what reads see
        return KVView(out[0][None], out[1][None], positions)

    def set_batch(self, meta: PagedBatch) -> None:
        """Install the metadata of the next forward; the backend plans it once for every layer."""
        self.meta, self.metas = meta, meta.groups or [meta]
        if len(self.metas) != len(self.attns):
            raise ValueError(f"this cache has {len(self.attns)} KV groups (local and global layers) but the "
                             f"batch has {len(self.metas)}: build it with a KVCacheCoordinator")
        for attn, m in zip(self.attns, self.metas):
            attn.prepare_metadata(m)

    def set_static_batch(self, meta: PagedBatch) -> None:
        """The same for a decode-only batch of fixed shapes (CUDA graphs, torch.compile)."""
        self.meta, self.metas = meta, [meta]
        self.attn.prepare_static_metadata(meta)

    def attend(self, layer: int, q: torch.Tensor, view: KVView, positions: torch.Tensor, backend=None,
               window: int | None = None) -> torch.Tensor:
        """Attention of the N queries q (1, nh, N, hd) over each one's sequence -> (1, nh, N, hd).
        ``backend`` is unused: the paged backend got its dense one at construction (vLLM: one per engine)."""
        self._need_meta(positions)
        group, layer = self.where[layer]
        return self.attns[group].forward(q, view.keys, view.values, layer, window)

    def in_place(self, layer: int, positions: torch.Tensor, backend=None):
        """As ``ContiguousKVCache.in_place``, for a batch of decodes only (one token per sequence), float32
        pages and an eager plan over a built-in backend; else None (update + attend)."""
        self._need_meta(positions)
        group, layer = self.where[layer]
        meta, attn = self.metas[group], self.attns[group]
        if self.quantized or self.kv.dtype != torch.float32 or attn.static or meta.num_tokens != len(meta.seq_lens) \
                or not (attn.dense is None or attn.dense in BACKENDS.values()):
            return None
        return "attn_paged", (self.kv, layer, meta.slot_mapping, meta.block_tables, meta.seq_lens)

    def _need_meta(self, positions: torch.Tensor) -> PagedBatch:
        meta = self.meta
        if meta is None:
            raise ValueError("PagedKVCache: call set_batch(PagedBatch) before the forward")
        if positions.dim() != 2 or positions.shape[0] != 1 or positions.shape[1] != meta.num_tokens:
            raise ValueError(f"PagedKVCache expects a flattened batch (1, {meta.num_tokens}) as set by "
                             f"set_batch; got positions of shape {tuple(positions.shape)}")
        return meta
