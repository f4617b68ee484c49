"""Command-line options that every command loading a model shares (``minfer generate``, ``bench *``,
``batch``): which model, on which device, in which dtype."""
import argparse
import math

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry name, HF folder or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """vLLM's parallel flags: this process starts the other workers itself (under torchrun: the world size)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                   help="shard the model over N worker processes (default 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1,
                   help="split the layers into N stages, one worker process each (default 1)")


def set_threads(n: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (None: torch's choice)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch
    torch.set_num_threads(n)


# argparse types: a bad value is refused at the parser, naming the flag (exit 2, one line).

def int_in(lo: int, hi: int | None = None):
    """The type of an integer >= ``lo`` (and <= ``hi``)."""
    rule = f">= {lo}" if hi is None else f"in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {rule}, got {text[:40]!r}")
        return value
    return parse


positive_int = int_in(1)


def seconds(text: str) -> float:
    """A finite number of seconds > 0 (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text[:40]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text[:40]!r}")
    return value


def seconds_or_zero(text: str) -> float:
    """``seconds``, or 0 (none, or at once)."""
    return 0.0 if text.strip() in ("0", "0.0") else seconds(text)


def int_list(text: str, flag: str) -> list[int]:
    """``"32,64,128"`` -> [32, 64, 128]; ValueError naming ``flag`` otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text[:80]!r}") from None


def float_list(text: str, flag: str) -> list[float]:
    """``"0.25,0.5"`` -> [0.25, 0.5] (finite numbers); ValueError naming ``flag`` otherwise."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} must be comma-separated finite numbers, got {text[:80]!r}")
    return values
