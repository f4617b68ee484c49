"""Device and dtype names as users type them (``--device cuda``, ``--dtype bf16``) -> torch objects."""
import warnings

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def cpu_bf16_units() -> str | None:
    """The bf16 matrix instructions oneDNN finds on this CPU: "AMX", "AVX-512 BF16", or None."""
    has = lambda name: bool(getattr(torch.cpu, name, lambda: False)())   # noqa: E731
    return "AMX" if has("_is_amx_tile_supported") else "AVX-512 BF16" if has("_is_avx512_bf16_supported") else None


def warn_if_no_bf16_units(device: torch.device, dtype: torch.dtype) -> None:
    """Say (once) that bf16 matmuls on this CPU are emulated: oneDNN widens them to float32 (docs/kernels.md)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_units() is None:
        warnings.warn(f"dtype bfloat16 on a CPU without AMX or AVX-512 BF16 (torch sees "
                      f"{torch.backends.cpu.get_cpu_capability()}): oneDNN emulates bf16 matmuls, slower than float32 "
                      "ones; bfloat16 saves memory here, not time (docs/kernels.md)", stacklevel=3)


def to_device(x, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or a list, made a tensor of ``dtype``) -> ``device`` without the host waiting: on a
    GPU by pinned memory and ``non_blocking=True``, as vLLM stages its step inputs (docs/architecture.md)."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
