"""Paged attention: the queries of a flattened batch against K/V read through block tables.

``prepare_metadata(batch)`` once per forward, ``forward(q, k, v, layer)`` per layer (vLLM's
``AttentionMetadataBuilder.build`` + ``AttentionImpl.forward``). Every plan and decode kernel is tested
equal to ``paged_attention_reference``. How each plan works: docs/kv-and-attention.md.
"""
import math
from dataclasses import dataclass, field

import torch

from minfer.attention import get_backend
from minfer.attention.flash import online_softmax_update
from minfer.attention.mask import allowed
from minfer.attention.reference import reference_attention
from minfer.attention.sdpa import sdpa, sdpa_attention
from minfer.devices import to_device

ATTENTION_MODES = ("split", "online")
DECODE_KERNELS = ("auto", "torch", "cpu", "triton")


def resolve_decode_kernel(name: str, device, dtype, kv_cache_dtype: str = "auto", attention_mode: str = "split"):
    """``decode_kernel`` -> (the name in use, the kernel or None for the torch path). "auto": the C++ kernel
    on a CPU in float32/bfloat16 with unquantized pages in split mode, when it builds; "cpu" / "triton"
    fail with the reason when they cannot run here."""
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {name!r}")
    device = torch.device(device)
    fits = kv_cache_dtype == "auto" and attention_mode == "split"
    cpu_ok = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if name == "torch" or (name == "auto" and not (fits and cpu_ok)):
        return "torch", None
    if not fits:
        raise ValueError(f"decode_kernel={name!r} reads unquantized pages in split mode; got "
                         f"kv_cache_dtype={kv_cache_dtype!r}, attention_mode={attention_mode!r}")
    if name == "triton":
        from minfer.kernels import paged_decode
        paged_decode._require_triton()
        return name, paged_decode.paged_decode_attention
    from minfer.kernels import cpu_paged_decode
    if name == "auto":
        ok = cpu_paged_decode.available()
        return ("cpu", cpu_paged_decode.cpu_paged_decode_attention) if ok else ("torch", None)
    if not cpu_ok:
        raise ValueError(f"decode_kernel='cpu' runs float32 or bfloat16 on the CPU; got {dtype} on {device}")
    if not cpu_paged_decode.available():
        raise RuntimeError(f"decode_kernel='cpu': the kernel could not be built "
                           f"({cpu_paged_decode.why_unavailable()}); it needs g++ and ninja")
    return name, cpu_paged_decode.cpu_paged_decode_attention


def make_paged_attention(cache, attention="sdpa", mode: str = "split", decode_kernel: str = "torch"):
    """The paged backend of ``cache``: ``attention`` names its dense backend (or is one, a callable)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
    dense = None if attention == "sdpa" else get_backend(attention) if isinstance(attention, str) else attention
    if dense is not None and decode_kernel == "auto":      # "auto" serves the SDPA path only
        decode_kernel = "torch"
    name, kernel = resolve_decode_kernel(decode_kernel, cache.k.device, cache.dtype, cache.kv_cache_dtype, mode)
    cls = PagedAttention if mode == "split" else OnlinePagedAttention
    return cls(cache, dense, kernel, name)


@dataclass
class _Group:
    """One dense-backend call of the split plan: some sequences' queries and the keys they read."""

    rows: slice | torch.Tensor | None  # its queries' rows: a range (a view), (G * T,) indices, None: all
    q_pos: torch.Tensor           # (G, T) query positions
    k_pos: torch.Tensor           # (G, W) key positions, -1 = padding; W = blocks read * block_size
    k_blocks: torch.Tensor | None # (G * W / block_size,) blocks to gather; None = the keys are this forward's own
    k_rows: torch.Tensor | None = field(default=None, kw_only=True)   # their kv_rows, once per forward
    num_seqs: int
    fresh: slice | None = None    # a prefill from position 0: its columns in this forward's k/v
    sdpa_mask: torch.Tensor | None = None   # (G, 1, T, S) for SDPA (None: all visible / causal)
    tables: torch.Tensor | None = None      # a decode group's (G, blocks) block-table rows, for a decode kernel
    lens: torch.Tensor | None = None        # a decode group's (G,) context lengths, on the device
    whole: bool = False           # the group is the whole batch, in order: no query gather or output scatter
    static: bool = False          # built by prepare_static_metadata: sdpa_mask applies the sliding window


def _as_range(rows: torch.Tensor, device) -> slice | torch.Tensor:
    """Host row indices (G,) -> a slice when consecutive (the usual case), so the queries are a view."""
    if len(rows) == 1 or bool((rows.diff() == 1).all()):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return to_device(rows, device)


class PagedAttention:
    """The engine's paged attention: the split plan (eager steps) and the static plan (captured steps).
    ``dense``: the backend on gathered K/V (None: SDPA); ``kernel``: a paged decode kernel (None: gather)."""

    def __init__(self, cache, dense=None, kernel=None, decode_kernel: str = "torch"):
        self.cache, self.dense, self.kernel, self.decode_kernel = cache, dense, kernel, decode_kernel
        self.groups: list[_Group] = []
        self.static = False

    def prepare_metadata(self, meta) -> None:
        """The split plan: every decode in one group, each prefill chunk in its own."""
        self.static, self.groups = False, []
        bs, device = self.cache.block_size, self.cache.k.device
        self.tables = meta.block_tables.to(device)                                  # (S, max blocks)
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
                self.groups.append(_Group(rows, q_pos, k_pos, self.tables[s, :nblk], 1,
                                          sdpa_mask=allowed(q_pos, k_pos)[:, None]))
        dec = torch.arange(len(qlens)) if only_decodes else decode.nonzero()[:, 0]  # (D,) host
        if len(dec):                                            # one backend call for every decode
            self.groups.append(self._decode_group(dec, slens, starts, bs, device, whole_batch=only_decodes))
        if len(self.groups) == 1 and (self.groups[0].num_seqs == 1 or only_decodes):
            self.groups[0].whole = True        # one sequence, or decodes only in one group (rows in order)
        self._index_rows()

    def _decode_group(self, idx: torch.Tensor, slens, starts, bs: int, device, whole_batch: bool) -> _Group:
        """Decodes ``idx`` (G,) in one group, padded to the blocks of the longest context (key position -1 = padding)."""
        sl = slens if whole_batch else slens[idx]                                   # (G,) host
        nblk = -(-int(sl.max()) // bs)
        width = nblk * bs
        sl_dev = to_device(sl, device)
        pos = torch.arange(width, device=device)
        k_pos = torch.where(pos[None] < sl_dev[:, None], pos[None], -1)            # (G, W)
        tables = self.tables if whole_batch else self.tables[to_device(idx, device)]   # (G, max blocks)
        q_pos = (sl_dev - 1)[:, None]                                               # (G, 1)
        padded = int(sl.min()) < width and self.kernel is None
        mask = allowed(q_pos, k_pos)[:, None] if padded else None                   # (G, 1, 1, W); none if unpadded
        rows = None if whole_batch else _as_range(starts[idx], device)              # whole: rows are 0..S-1
        return _Group(rows, q_pos, k_pos, tables[:, :nblk].flatten(), len(idx), sdpa_mask=mask,
                      tables=tables[:, :nblk], lens=sl_dev)

    def prepare_static_metadata(self, meta) -> None:
        """A decode-only batch of fixed shapes (CUDA graphs, torch.compile): each row's query over all W keys
        of its table row, masked past its context, on the device. vLLM: ``CommonAttentionMetadata`` with a
        fixed ``max_seq_len``. Why: docs/kernels.md."""
        self.static, self.tables = True, meta.block_tables                         # (S, cols) device
        S, cols = meta.block_tables.shape
        pos = torch.arange(cols * self.cache.block_size, device=self.tables.device)  # (W,)
        sl = meta.seq_lens                                                          # (S,) device
        k_pos = torch.where(pos[None] < sl[:, None], pos[None], -1)                 # (S, W), -1 = padding
        q_pos = (sl - 1)[:, None]                                                   # (S, 1)
        mask = allowed(q_pos, k_pos, self.cache.cfg.sliding_window)[:, None]        # (S, 1, 1, W)
        self.groups = [_Group(None, q_pos, k_pos, self.tables.flatten(), S, sdpa_mask=mask, whole=True,
                              static=True)]              # every block of every row, masked past the context
        self._index_rows()

    def _index_rows(self) -> None:
        """Each group's gather rows, computed once here rather than in every layer."""
        for g in self.groups:
            if g.k_blocks is not None and not self.cache.quantized and not self._kernel_reads(g):
                g.k_rows = self.cache.kv_rows(g.k_blocks)

    def _kernel_reads(self, g: _Group) -> bool:
        """Whether the decode kernel, not gather + dense backend, runs this group (eager decode groups)."""
        return self.kernel is not None and g.lens is not None and not self.static

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                window: int | None = None) -> torch.Tensor:
        """One call per group (see ``prepare_metadata``): q (1, nh, N, hd) -> (1, nh, N, hd)."""
        cache = self.cache
        nh, nkv, hd = q.shape[1], cache.k.shape[3], cache.k.shape[4]
        out = None if self.groups[0].whole else torch.empty_like(q)
        for g in self.groups:
            G = g.num_seqs
            qs = q[0] if g.whole else q[0][:, g.rows]                                # (nh, G * T, hd)
            if self._kernel_reads(g):                                                # the pool read in place
                o = self.kernel(qs.transpose(0, 1), cache.k[layer], cache.v[layer], g.tables, g.lens,
                                window=window).transpose(0, 1)[:, :, None]           # (nh, G, 1, hd)
            else:                                                   # one whole sequence: q as it is
                qg = q if G == 1 and g.whole else qs.reshape(nh, G, -1, hd).transpose(0, 1)   # (G, nh, T, hd)
                if g.k_blocks is None:
                    keys, values = k[:, :, g.fresh], v[:, :, g.fresh]                # (1, nkv, T, hd)
                else:
                    keys, values = cache.read_blocks(layer, g.k_blocks, g.k_rows, reuse=not self.static)
                    keys = keys.view(G, -1, nkv, hd).transpose(1, 2)                 # (G, nkv, W, hd)
                    values = values.view(G, -1, nkv, hd).transpose(1, 2)
                o = self._dense(g, qg, keys, values, window).transpose(0, 1)         # (nh, G, T, hd)
            if g.whole:
                return o.reshape(nh, -1, hd)[None]                                   # (1, nh, N, hd)
            out[0][:, g.rows] = o.reshape(nh, -1, hd)
        return out

    def _dense(self, g: _Group, q, keys, values, window):
        """The dense backend on one group; SDPA (dense None) with the plan's mask, computed once per forward."""
        if self.dense is not None:
            return self.dense(q, keys, values, g.q_pos, g.k_pos, window=window)     # (G, nh, T, hd)
        if window is not None and not g.static:                                     # the window joins the mask
            return sdpa_attention(q, keys, values, g.q_pos, g.k_pos, window)
        return sdpa(q, keys, values, is_causal=True) if g.fresh is not None else \
            sdpa(q, keys, values, attn_mask=g.sdpa_mask)


class OnlinePagedAttention(PagedAttention):
    """The teaching version: each sequence folds its blocks one by one into FlashAttention's online softmax
    (``attention/flash.py``), PagedAttention's kernel loop (vLLM: ``csrc/attention/paged_attention_v1.cu``)
    in Python. Static steps: the split plan."""

    def prepare_metadata(self, meta) -> None:
        self.static, self.meta, self.tables = False, meta, meta.block_tables.to(self.cache.k.device)

    def forward(self, q, k, v, layer, window=None):
        if self.static:                                 # a captured decode step runs the static plan
            return super().forward(q, k, v, layer, window)
        nh, hd, bs = q.shape[1], q.shape[3], self.cache.block_size
        nkv = self.cache.k.shape[3]
        out, row = torch.zeros_like(q), 0
        for s, (T, L) in enumerate(zip(self.meta.query_lens.tolist(), self.meta.seq_lens.tolist())):
            qs = q[0, :, row:row + T].float().reshape(nkv, nh // nkv, T, hd)         # heads grouped per K/V head
            q_pos = torch.arange(L - T, L, device=q.device)[None]                   # (1, T)
            m = torch.full((nkv, nh // nkv, T, 1), float("-inf"), device=q.device)  # running max
            l, acc = torch.zeros_like(m), torch.zeros_like(qs)                      # running sum, output
            for j in range(-(-L // bs)):                                            # logical block j
                k_pos = j * bs + torch.arange(bs, device=q.device)
                k_pos = k_pos.masked_fill(k_pos >= L, -1)[None]                     # (1, bs), -1 past the end
                visible = allowed(q_pos, k_pos, window)[0]                          # (T, bs)
                if not bool(visible.any()):                                         # e.g. outside the window
                    continue
                kb, vb = self.cache.read_blocks(layer, self.tables[s, j:j + 1])     # (bs, nkv, hd) each
                scores = qs @ kb.float().permute(1, 2, 0)[:, None] / math.sqrt(hd)  # (nkv, g, T, bs)
                scores = scores.masked_fill(~visible, float("-inf"))
                m, l, acc = online_softmax_update(m, l, acc, scores, vb.float().transpose(0, 1)[:, None])
            out[0, :, row:row + T] = (acc / l.clamp_min(torch.finfo(l.dtype).tiny)).reshape(nh, T, hd)
            row += T
        return out


def paged_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              query_lens: torch.Tensor | None = None, window: int | None = None,
                              scale: float | None = None) -> torch.Tensor:
    """The one reference every paged backend and kernel is tested against. Slow and obvious.

        q                (N, nh, hd)   the queries of S sequences side by side (N = sum of query_lens)
        k_pool, v_pool   (num_blocks, block_size, nkv, hd)   one layer of the pool, dequantized
        block_tables     (S, max blocks);  seq_lens (S,) contexts, new tokens included
        query_lens       (S,)  the last positions of each context (None: one each, a decode)
        -> (N, nh, hd)
    Per sequence: slots through the block table, gather, ``reference_attention``. vLLM: ``ref_paged_attn``
    (``tests/kernels/attention/test_attention.py``)."""
    S, bs = len(seq_lens), k_pool.shape[1]
    query_lens = torch.ones(S, dtype=torch.long) if query_lens is None else query_lens
    out, row = torch.zeros_like(q), 0
    for s in range(S):
        L, T = int(seq_lens[s]), int(query_lens[s])
        if L > 0:
            pos = torch.arange(L, device=q.device)
            slots = block_tables[s].long()[pos // bs] * bs + pos % bs                # (L,)
            keys = k_pool.flatten(0, 1)[slots].transpose(0, 1)[None]                  # (1, nkv, L, hd)
            values = v_pool.flatten(0, 1)[slots].transpose(0, 1)[None]
            o = reference_attention(q[row:row + T].transpose(0, 1)[None], keys, values, pos[None, L - T:],
                                    pos[None], window=window, scale=scale)           # (1, nh, T, hd)
            out[row:row + T] = o[0].transpose(0, 1)
        row += T
    return out
