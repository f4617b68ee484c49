"""What the benchmarks share: interleaved timing (medians), their flags, the JSON envelope, the table."""
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def interleaved(methods: dict[str, Callable], repeats: int, warmup: int = 1,
                log: Callable[[str], None] = print, outputs: dict | None = None,
                rounds: dict | None = None) -> dict[str, dict]:
    """Call each method `warmup` times, then `repeats` rounds of A, B, C, ...

    Each call returns a dict of numbers, or None to be timed (``{"s": its wall seconds}``); the result
    maps method -> median of each number. With ``outputs``, each call returns (numbers, output) and
    ``outputs[method]`` keeps the last output; ``rounds[method]`` gets the numbers of every round.
    """
    for name, fn in methods.items():
        for _ in range(warmup):
            log(f"  warm-up {name} ...")
            fn()
    samples: dict[str, list[dict]] = {} if rounds is None else rounds
    samples.update({name: [] for name in methods})
    for r in range(repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            res = fn()
            if outputs is not None:
                res, outputs[name] = res
            res = {"s": time.perf_counter() - t} if res is None else res
            samples[name].append(res)
            log(f"  round {r + 1}/{repeats} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
    return {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}


def add_run_args(p, name: str, repeats: int | None = 3, threads: int | None = None) -> None:
    """The flags every benchmark takes: ``--repeats`` (interleaved rounds), ``--threads``, ``--json [PATH]``."""
    from minfer.cli_args import positive_int
    if repeats is not None:
        p.add_argument("--repeats", type=positive_int, default=repeats,
                       help=f"interleaved rounds; medians reported (default {repeats})")
    default = threads or "torch's choice"
    p.add_argument("--threads", type=positive_int, default=threads,
                   help=f"torch CPU threads (default: {default}; 1 is steadier on a busy machine)")
    p.add_argument("--json", nargs="?", const=f"bench_results/{name}.json", default=None,
                   help=f"also write the results as JSON (default path bench_results/{name}.json)")


def write_json(path: str | Path | None, payload: dict) -> None:
    """Atomic JSON write (``minfer.atomic``) with the run's envelope (``run_envelope``); logs the path.
    No ``path`` (``--json`` not given): nothing is written."""
    if not path:
        return
    from minfer import atomic
    atomic.write_json(path, {**run_envelope(payload), **payload})
    log(f"wrote {path}")


def run_envelope(payload: dict) -> dict:
    """What ``minfer bench report`` needs of every run: the command, the date, the machine, its load average
    (a shared machine makes single figures noisy) and ``MINFER_BENCH_NOTE``, a free-text note."""
    import datetime
    import os
    import shlex
    from minfer.bench.machine import machine_info
    argv = sys.argv[1:]
    env = {"command": "minfer " + shlex.join(argv) if argv[:1] == ["bench"] else shlex.join(sys.argv),
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine_info(payload.get("device", "cpu")),
           "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if argv[:1] == ["bench"] and len(argv) > 1:
        env["benchmark"] = argv[1]
    if os.environ.get("MINFER_BENCH_NOTE"):
        env["note"] = os.environ["MINFER_BENCH_NOTE"]
    return env


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Right-aligned plain-text table. columns: (key, header, format); empty columns are left out."""
    columns = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "n/a" for k, _, fmt in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h, _) in enumerate(columns)]
    head = " | ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))
    lines = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([head, "-" * len(head), *lines])


def log(msg: str) -> None:
    """Progress goes to stderr; the tables go to stdout."""
    print(msg, file=sys.stderr, flush=True)


def names(text: str, flag: str, choices=None) -> list[str]:
    """``"a, b"`` -> ["a", "b"]; ValueError naming ``flag`` for a name not in ``choices``."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    if choices is not None and (bad := [x for x in out if x not in choices]):
        raise ValueError(f"{flag}: unknown {bad}; choose from {list(choices)}")
    return out


def positive_ints(text: str, flag: str) -> list[int]:
    """``"1,8"`` -> [1, 8]; ValueError naming ``flag`` unless every value is an integer >= 1."""
    from minfer.cli_args import int_list
    values = int_list(text, flag)
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: every value must be >= 1, got {text!r}")
    return values


def rates(t0: float, times: list[float]) -> dict:
    """Token times of a run started at ``t0`` -> {"ttft": seconds, "decode_tps": tokens/s after the first}."""
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft": times[0] - t0, "decode_tps": tps}


def timed_generate(model, prompt_ids: list[int], params, generate=None, **kw) -> tuple[dict, list[int]]:
    """One batch-1 generation (``generate_tokens`` unless ``generate``), timed by the ``RequestStats`` it
    fills -> (``rates``, the tokens)."""
    from minfer.generate import generate_tokens
    from minfer.metrics import RequestStats
    m = RequestStats(arrival_time=time.perf_counter())
    toks = list((generate or generate_tokens)(model, prompt_ids, params, metrics=m, **kw))
    return rates(m.arrival_time, m.token_times), toks
