"""Paged decode attention on the CPU: ``cpu_paged_decode.cpp``, compiled on first use.

The loop of ``paged_decode.py`` (Triton), written in C++ for the CPU: one work
item per sequence (per group of its K/V heads when there are fewer sequences
than threads), over torch's intra-op threads. Each item reads its sequence's
keys and values from the pool through the block table. The engine's plain
path first gathers them into a copy padded to the longest context, then calls
SDPA: it reads the context twice and writes it once; the kernel reads it once.
Measured on a 2-core CPU: 1.07-1.44x the plain path's speed with equal
lengths (``minfer bench attention``), 2.3x at 29 ragged contexts of 300-760
keys, and 1.10x the whole engine's throughput on the 32-request serving
workload (``minfer bench serve --baselines torch-decode``).

vLLM's CPU backend has the same kernel (``csrc/cpu/attention.cpp``).

The C++ is compiled on first use by ``torch.utils.cpp_extension`` (g++ and
ninja are needed; ~30 s on 2 cores, then cached per CPU type in
``~/.cache/minfer/kernels``, or ``$MINFER_KERNEL_CACHE``). Where it cannot be
built, ``available()`` is False, ``why_unavailable()`` says what failed, and
the engine keeps its plain path. Tests: ``tests/test_cpu_kernel.py``.
"""
import contextlib
import hashlib
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from minfer.kernels import check_paged_decode_args

_SOURCE = Path(__file__).with_name("cpu_paged_decode.cpp")
# -fopenmp: at::parallel_for is OpenMP pragmas in torch's headers, so without it the loop runs on one
# thread. The extension then needs libgomp.so.1, which resolves to the copy torch has already loaded.
# -ffast-math (compile only): lets GCC call glibc's vector expf and reorder the dot products; the
# softmax's exponentials were 20% of the kernel's time one by one. Never at link time: GCC 12 would
# then link crtfastmath.o, which sets flush-to-zero for the whole process (tests/test_cpu_kernel.py).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
_state: dict = {}          # "module" once built, or "error": why it could not be


def _cpu_key(source: Path = _SOURCE) -> str:
    """A short id of this CPU's instruction set: -march=native code must not run on another CPU type."""
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    code = source.read_bytes()                       # and the local files it #includes
    code += b"".join((source.parent / n.decode()).read_bytes() for n in re.findall(rb'#include "(.+)"', code))
    text = f"{platform.machine()} {flags} {torch.__version__} {_FLAGS} {code!r}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's copy is not there when the venv's
    bin/ is not on PATH (a script called by its full path), so put it there."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def _build_lock(build: Path):
    """One builder at a time per folder, by an OS lock that dies with its process.

    torch's builder marks a build in progress with a plain ``lock`` file and waits while it exists;
    a builder killed mid-build (out of memory, a timeout) leaves it behind, and every later process
    would wait forever. Holding this ``flock`` proves no live minfer builder is at work, so a
    ``lock`` file seen while holding it is stale and removed.
    """
    import fcntl                           # POSIX; elsewhere the build fails and the plain path runs

    with open(build / "minfer.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_built(build: Path, name: str = "minfer_cpu_paged_decode"):
    """The module already built in ``build``, or None. The folder's name is a hash of the source,
    the flags, torch and the CPU, so a finished ``.so`` there is this kernel: load it without
    asking ninja, which would rebuild when the checkout's path or its dependency log changed."""
    import importlib.util

    so = build / f"{name}.so"
    if not (so.is_file() and (build / "minfer.built").is_file()):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:                    # a damaged file: build again
        return None


def build_extension(source: Path = _SOURCE, what: str = "CPU paged-decode kernel"):
    """Compile ``source`` (a .cpp beside this file) into a module, or load it from the cache.
    Every C++ kernel of minfer is built here, with the flags and the cache described above."""
    from torch.utils import cpp_extension

    _ninja_on_path()

    name = f"minfer_{source.stem}"
    root = Path(os.environ.get("MINFER_KERNEL_CACHE", Path.home() / ".cache" / "minfer" / "kernels"))
    build = root / f"{source.stem}-{_cpu_key(source)}"
    build.mkdir(parents=True, exist_ok=True)
    fresh = not any(build.glob("*.so"))
    if fresh:
        print(f"minfer: compiling the {what} (once per machine, ~30 s on 2 cores) ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with _build_lock(build):
        built = _load_built(build, name)
        if built is not None:
            return built
        module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=_FLAGS,
                                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
        (build / "minfer.built").write_text("")  # the .so is complete: later processes load it directly
    if fresh:
        print(f"minfer: compiled in {time.perf_counter() - t0:.0f} s ({build})", file=sys.stderr, flush=True)
    return module


def _module():
    if "module" not in _state and "error" not in _state:
        try:
            _state["module"] = build_extension()
        except Exception as e:             # no compiler, no ninja, a failed build: say so, keep the plain path
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
            print(f"minfer: the CPU paged-decode kernel could not be built ({_state['error']}; it needs g++ "
                  "and ninja); decode attention runs on the plain gather + SDPA path", file=sys.stderr, flush=True)
    return _state.get("module")


def available() -> bool:
    """True when the kernel is built (building it now if needed)."""
    return _module() is not None


def why_unavailable() -> str | None:
    """Why the kernel could not be built, or None."""
    _module()
    return _state.get("error")


def cpu_paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Decode attention over the paged pool with the C++ kernel -> (S, nh, hd) in q's dtype, on the CPU.
    Pages in float32 or bfloat16; the arithmetic is float32 (bf16 q is widened, the result rounded once).

    The interface of ``paged_decode_attention`` (Triton): q (S, nh, hd), k/v caches
    (num_blocks, block_size, nkv, hd), block_tables (S, max_blocks), context_lens (S,).
    """
    module = _module()
    if module is None:
        raise RuntimeError(f"the CPU paged-decode kernel could not be built ({_state['error']}); it needs g++ "
                           "and ninja (pip install ninja). The engine falls back to gather + SDPA without it.")
    check_paged_decode_args(q, k_cache, v_cache, block_tables, context_lens)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = module.paged_decode((q.float() if q.dtype == torch.bfloat16 else q).contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                              block_tables.long(), context_lens.long(), float(scale), int(window or 0))
    return out.to(q.dtype)
