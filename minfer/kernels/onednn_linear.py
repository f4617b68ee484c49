"""CPU linears through oneDNN with the weight reordered once, at load time ("prepacking").

``F.linear`` on a CPU hands each product to a BLAS call that lays out the weight for the
multiply on every call. A decode step multiplies 1-32 rows by every weight matrix of the
model, so this per-call work and a poor kernel choice for tiny row counts dominate: with
torch 2.13's MKL on the 2-core dev machine (weights streamed from DRAM, 1 thread),

    rows M              1       2       3       4
    F.linear 1536x576   222 us  348 us  403 us  334 us
    prepacked           141 us  125 us  127 us  133 us
    LM head 49152x576   6.9 ms  14.8 ms 22.1 ms 12.3 ms   (F.linear)
    prepacked           4.0 ms  3.5 ms  3.7 ms  3.8 ms

Prepacked, a 2-4 row product costs what a 1-row product costs, as the weight is read once
whatever the rows: the premise of speculative verification (``minfer/speculative``, Medusa)
holds on a CPU too. Measure it on your machine with ``minfer bench decode --methods cached,packed``.

Which rows pay depends on the CPU and its BLAS. On an AMD EPYC VM, oneDNN won at every
row count (batch-1 decode 2.3x). On an Intel Xeon (Sapphire Rapids VM, 2 cores), MKL's
``F.linear`` is faster at 1-3 rows and slow from 4 rows on, where oneDNN takes over
(every matrix of SmolLM2 once, weights in cache, 2 threads):

    rows M              1      2      3      4      6      16     29     64     512
    F.linear (ms)       10.0   10.6   11.8   22.6   29.9   50.3   74.6   93.7   625
    prepacked (ms)      14.7   15.8   16.7   18.9   20.0   30.7   54.3   83.7   633

so ``PackedLinear(rows=(lo, hi))`` runs oneDNN for ``lo <= M <= hi`` rows only and
``F.linear`` (on the same plain weight, bit for bit the unpacked result) otherwise.
``BATCHED_ROWS = (4, 128)`` is the range ``LLM``'s default uses: the engine's batched decode
steps, not batch-1 decode (1 row) nor a 512-token prefill chunk. Through ``LLM.generate`` on
32 requests it made the run 1.09x faster here (47.7 vs 52.2 s, greedy tokens identical).

``pack_linears(model)`` swaps every ``nn.Linear`` (and a tied LM head) for a ``PackedLinear``
that keeps the original weight (so ``state_dict`` and equality checks still work; the cost
is a second copy of the weights in memory) beside oneDNN's reordered copy. It is the path
``torch.compile`` takes on CPU with ``freezing`` (inductor's ``mkldnn._linear_pointwise``),
and what vLLM's CPU backend gets from oneDNN/IPEX; here it is one small module, no compiler.
Results equal ``F.linear`` up to fp32 summation order (tested in ``tests/test_kernels.py``).
In bfloat16 (a CPU with bf16 units) they equal it bit for bit: torch's bf16 ``F.linear`` is oneDNN
too, minus the per-call reorder (docs/kernels.md, "bfloat16 on the CPU").
"""
import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 32       # oneDNN picks its weight layout for this many rows; fine from 1 to 128 rows
BATCHED_ROWS = (4, 128)   # LLM's default range of rows for oneDNN (see the module docstring)
DTYPES = (torch.float32, torch.bfloat16)   # the weight dtypes it packs


def available() -> bool:
    """True when this torch build has oneDNN (mkldnn) and its prepacked linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_why_not: dict = {}


def why_not_packable(dtype: torch.dtype) -> str | None:
    """None when oneDNN can prepack ``dtype`` weights on this CPU, else why not. oneDNN's bf16 linear
    needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT even to emulate the products; an AVX2-only CPU has
    neither, and there bf16 linears stay on ``F.linear`` (torch's own bf16 GEMM)."""
    if not available():
        return "this torch build has no oneDNN (mkldnn) prepacked linear"
    if dtype not in _why_not:
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), BATCH_HINT)
            _why_not[dtype] = None
        except RuntimeError as e:
            _why_not[dtype] = (f"oneDNN cannot prepack {dtype} weights on this CPU (torch sees "
                               f"{torch.backends.cpu.get_cpu_capability()}): {str(e).strip().splitlines()[0]}")
    return _why_not[dtype]


class PackedLinear(nn.Module):
    """``nn.Linear`` (fp32 or bf16, CPU) computed by oneDNN on a weight reordered once."""
    min_rows = 1      # 2 with batch_invariant=True: a lone row padded to two (docs/kernels.md)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 rows: tuple[int, int] | None = None, tied: bool = False):
        super().__init__()
        self.tied = tied          # the weight is another module's (a tied LM head): not in the state dict
        self.rows = rows          # oneDNN for lo <= rows <= hi, F.linear otherwise; None: every row count
        if weight.device.type != "cpu" or weight.dtype not in DTYPES:
            raise ValueError(f"PackedLinear needs a float32 or bfloat16 CPU weight, "
                             f"got {weight.dtype} on {weight.device}")
        if why := why_not_packable(weight.dtype):
            raise ValueError(f"PackedLinear: {why}; keep this linear unpacked (F.linear)")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)   # opaque layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)          # the packed op has no backward
        m = x.numel() // self.in_features
        if self.rows is not None and not self.rows[0] <= m <= self.rows[1]:
            return F.linear(x, self.weight, self.bias)          # a row count the BLAS does better
        if m < self.min_rows:         # batch invariance: a lone row through the many-row kernel
            y = self(F.pad(x.reshape(m, self.in_features), (0, 0, 0, self.min_rows - m)))[:m]
            return y.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.tied:                 # a tied head's weight is saved once, as the embedding
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not self.tied:                 # loaded through the embedding it shares
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_linear(self) -> nn.Linear | None:
        """The plain ``nn.Linear`` on the same weight and bias (None for a tied LM head: the embedding)."""
        if self.tied:
            return None
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias if isinstance(self.bias, nn.Parameter) else nn.Parameter(self.bias, requires_grad=False)
        return lin

    def __deepcopy__(self, memo) -> nn.Linear | None:
        """A deep copy is a plain ``nn.Linear`` with copied weights: oneDNN's opaque layout has no
        storage to copy (speculative decoding's int4 self-draft deep-copies and quantizes the target)."""
        import copy
        return copy.deepcopy(self.to_linear(), memo)

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f" for {self.rows[0]}-{self.rows[1]} rows"
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked{rows}"


def pack_linears(model: nn.Module, rows: tuple[int, int] | None = None) -> int:
    """Replace every fp32 or bf16 CPU ``nn.Linear`` of ``model`` (and a tied LM head) by a ``PackedLinear``
    (oneDNN for ``rows`` only, when given), in place; returns how many. Inference only: train or
    quantize the unpacked model."""
    for dtype in {p.dtype for p in model.parameters() if p.device.type == "cpu"} & set(DTYPES):
        if why := why_not_packable(dtype):
            raise RuntimeError(f"{why}; drop the packing option to use F.linear")
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in DTYPES:
                setattr(parent, name, PackedLinear(child.weight, child.bias, rows))
                count += 1
    inner = getattr(model, "model", None)
    if getattr(model, "lm_head", None) is None and inner is not None and hasattr(inner, "embed_tokens"):
        w = inner.embed_tokens.weight                         # tied: the LM head reads the embedding
        if w.device.type == "cpu" and w.dtype in DTYPES:
            model.lm_head = PackedLinear(w, rows=rows, tied=True)
            count += 1
    return count


def unpack_linears(model: nn.Module) -> int:
    """Undo ``pack_linears`` in place: every ``PackedLinear`` becomes a plain ``nn.Linear`` on the same
    weight (a tied LM head goes away, the embedding serves again); returns how many. Code that
    changes weights in place (quantization, sparsification) calls this first: a packed copy would
    go on computing with the old weights."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, child.to_linear())
                count += 1
    return count
