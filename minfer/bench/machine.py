"""What this machine can do: measured memory bandwidth and matmul FLOP/s, the ceilings that a decode loop's
bytes and FLOPs per second are compared with (``mbu``)."""
import os
import platform
import statistics
import time

import torch

from minfer.devices import cpu_bf16_units


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device, repeats: int) -> float:
    """Median wall time of ``fn()`` after one warm-up call, the device synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(device="cpu", nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: time to sum a buffer much larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / _median_seconds(x.sum, device, repeats)


def mbu(bytes_per_token: float, tokens_per_s: float, bandwidth: float) -> float:
    """Model-bandwidth utilisation: bytes read per token x tokens/s, over the memory bandwidth.

    1.0 means the decode loop streams its weights and KV as fast as the memory delivers them,
    the ceiling of a memory-bound step (Databricks' "MBU"; gpt-fast reports the same number).
    """
    return bytes_per_token * tokens_per_s / bandwidth


def linear_intensity(num_tokens: int, in_features: int, out_features: int, bytes_per_value: float) -> float:
    """Arithmetic intensity (FLOP per byte) of y = x W^T for ``num_tokens`` rows of x: 2 T in out FLOPs
    over the bytes of W, x and y moved once (the roofline's x axis; lesson 02's exercise)."""
    flops = 2 * num_tokens * in_features * out_features
    return flops / (bytes_per_value * (in_features * out_features + num_tokens * (in_features + out_features)))


def measure_flops(device="cpu", n: int = 1024, dtype=torch.float32, repeats: int = 5) -> float:
    """Dense matmul FLOP/s (2 n^3 per n x n product)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, repeats)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device="cpu") -> str:
    """One line naming the machine a benchmark ran on (every benchmark prints it)."""
    mi = machine_info(device)
    gpu = f", {mi['gpu']}" if "gpu" in mi else ""
    return (f"machine: {mi['processor']}, {mi['cpu_count']} CPUs, {mi['torch_threads']} torch threads, "
            f"torch {mi['torch']}, {device}{gpu}, CPU bf16 units: {mi['cpu_bf16']}")


def machine_info(device="cpu") -> dict:
    info = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_bf16": cpu_bf16_units() or "none",      # AMX / AVX-512 BF16: what oneDNN's bf16 matmuls run on
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
