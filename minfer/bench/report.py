"""``minfer bench report``: docs/benchmarks.md, made from the JSON files the benchmarks write: one section
per file (command, machine, date, the tables of ``TABLES``), nothing typed by hand (docs/measuring.md)."""
import argparse
import json
from pathlib import Path

# A column: (key in the row, header, format). Missing values print as "-".
Column = tuple[str, str, str]
HYBRID: list[Column] = [("context", "context", "{}"), ("full_B_per_token", "full B/token", "{:.0f}"),
                        ("hybrid_B_per_token", "hybrid B/token", "{:.0f}"),
                        ("ratio", "full/hybrid", "{:.2f}x")]

TABLES: dict[str, list[tuple[str, str, list[Column]]]] = {   # benchmark -> (title, rows' key, columns)
    "decode": [
        ("Batch-1 decode (medians of the interleaved rounds)", "results", [
            ("method", "method", "{}"), ("decode_tps", "decode tok/s", "{:.2f}"), ("ttft", "TTFT s", "{:.3f}"),
            ("tpot_ms", "TPOT ms", "{:.1f}"), ("speedup_vs_naive", "x naive", "{:.2f}"),
            ("x_llama_cpp", "x llama.cpp", "{:.2f}"),
            ("bandwidth_fraction", "MBU", "{:.0%}"), ("same_tokens_as_cached", "greedy = cached", "{}"),
            ("teacher_forced_top1", "top-1 = cached (forced)", "{:.1%}"),
            ("free_running_prefix", "same prefix (free)", "{}")]),
        ("KV-cache quantization vs the fp32 cache", "kv_quantization", [
            ("format", "format", "{}"), ("cache_bytes_ratio", "bytes vs fp32", "{:.3f}"),
            ("max_logit_error", "max abs dlogit", "{:.3f}"),
            ("teacher_forced_top1_agreement", "top-1 agree (teacher-forced)", "{:.1%}"),
            ("first_divergence", "first diverging token", "{}")]),
    ],
    "kv": [
        ("KV capacity within the memory budget", "capacity", [
            ("method", "method", "{}"), ("max_seqs", "max concurrent seqs", "{}"),
            ("x_contiguous", "x contiguous", "{:.2f}"), ("fragmentation", "fragmentation", "{:.1%}")]),
        ("TTFT with a shared prefix", "ttft", [
            ("method", "method", "{}"), ("prefilled", "prefilled", "{}"), ("ttft_ms", "TTFT ms", "{:.1f}"),
            ("x_faster", "x vs cache off", "{:.2f}")]),
    ],
    "attention": [
        ("Decode attention, one call per layer (ms per decode step)", "rows", [
            ("batch", "batch", "{}"), ("context", "context", "{}"), ("kv_mb", "K/V MB read", "{:.0f}"),
            ("repeat_ms", "K/V repeated", "{:.2f}"), ("gqa_ms", "enable_gqa", "{:.2f}"),
            ("folded_ms", "heads folded", "{:.2f}"), ("paged_ms", "paged: gather + folded", "{:.2f}"),
            ("cpu_ms", "C++ kernel", "{:.2f}"), ("cpu_x_paged", "kernel: x paged", "{:.2f}"),
            ("triton_ms", "Triton kernel", "{:.2f}")]),
    ],
    "serve": [
        ("Offline throughput, every request at t = 0", "offline.rows", [
            ("method", "method", "{}"), ("seconds", "seconds", "{:.1f}"), ("output_tok_s", "output tok/s", "{:.2f}"),
            ("x_continuous", "continuous is x faster", "{:.2f}"), ("output_tok_per_cpu_s", "tok per CPU-s", "{:.2f}"),
            ("x_continuous_cpu", "x (CPU time)", "{:.2f}"), ("same_greedy", "greedy = continuous", "{}")]),
        ("Front door: one LLM.generate of the list vs one prompt per call", "front_door.rows", [
            ("name", "method", "{}"), ("output_tok_s", "output tok/s", "{:.2f}"), ("seconds", "seconds", "{:.1f}")]),
        ("Online: requests arriving at the rate", "online", [
            ("name", "policy", "{}"), ("ttft.median", "median TTFT ms", "{:.0f}"),
            ("ttft.p99", "p99 TTFT ms", "{:.0f}"), ("tpot.p99", "p99 TPOT ms", "{:.0f}"),
            ("output_throughput", "output tok/s", "{:.2f}"), ("goodput", "goodput req/s", "{:.3f}")]),
        ("Throughput vs latency as the rate rises", "sweep", [
            ("policy", "policy", "{}"), ("rate", "rate req/s", "{:g}"), ("output_throughput", "output tok/s", "{:.2f}"),
            ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"), ("goodput", "goodput req/s", "{:.3f}")]),
    ],
    "quant": [
        ("Weight-only quantization, batch-1 decode", "results", [
            ("format", "format", "{}"), ("weight_mb", "weights read MB", "{:.0f}"),
            ("decode_tps", "decode tok/s", "{:.1f}"), ("speedup", "x fp32", "{:.2f}"),
            ("perplexity", "perplexity", "{:.3f}"), ("ppl_change", "vs fp32", "{:+.2%}"),
            ("greedy_agreement", "greedy = fp32 (free)", "{:.0%}"),
            ("teacher_forced_agreement", "greedy = fp32 (per step)", "{:.0%}")]),
    ],
    "spec": [
        ("Speculative decoding vs plain decoding, greedy", "results", [
            ("task", "task", "{}"), ("method", "method", "{}"), ("decode_tps", "tok/s", "{:.1f}"),
            ("speedup", "x plain", "{:.2f}"), ("acceptance_rate", "accept", "{:.0%}"),
            ("tokens_per_forward", "tok/fwd", "{:.2f}"), ("theory_tokens_per_forward", "theory", "{:.2f}"),
            ("identical", "= plain", "{}")]),
        ("Inside the engine: c concurrent requests, one batched forward per step", "engine", [
            ("concurrency", "requests", "{}"), ("method", "method", "{}"), ("tok_s", "tok/s", "{:.1f}"),
            ("speedup", "x plain engine", "{:.2f}"), ("forwards", "forwards", "{}"),
            ("tokens_per_forward", "tok/fwd", "{:.2f}"), ("identical", "= plain", "{}")]),
    ],
    "hybrid": [
        ("Local/global KV cache: bytes per token of one sequence, allocated caches", "rows", HYBRID),
        ("The paged engine's blocks (block size 16, token budget 512)", "engine",
         HYBRID + [("hybrid_peak_B_per_token", "hybrid peak in prefill", "{:.0f}")]),
    ],
    "evict": [
        ("KV eviction: perplexity and top-1 agreement with the full cache", "rows", [
            ("policy", "policy", "{}"), ("budget", "budget", "{}"), ("ppl", "perplexity", "{:.2f}"),
            ("agreement", "top-1 = full", "{:.0%}"), ("kv_bytes", "KV bytes", "{}")]),
    ],
    "guided": [
        ("Structured output: the token mask per decode step (medians)", "rows", [
            ("batch", "batch", "{}"), ("mask_ms", "mask ms", "{:.2f}"), ("unguided_step_ms", "unguided step ms", "{:.1f}"),
            ("guided_step_ms", "guided step ms", "{:.1f}"), ("mask_ratio", "mask / unguided step", "{:.1%}"),
            ("step_ratio", "guided / unguided step", "{:.2f}")]),
    ],
    "guidellm": [
        ("guidellm and `minfer bench serve --url` on one server and workload (medians of the alternated rounds)",
         "summary", [("tool", "client", "{}"), ("output_tok_s", "output tok/s", "{:.2f}"),
                     ("req_s", "requests/s", "{:.3f}"), ("x_minfer", "x minfer's tok/s", "{:.3f}"),
                     ("spread", "(max - min) / median of its rounds", "{:.1%}")]),
        ("Each round, in the order run", "rounds", [
            ("round", "round", "{}"), ("tool", "client", "{}"), ("output_tok_s", "output tok/s", "{:.2f}"),
            ("req_s", "requests/s", "{:.3f}")]),
    ],
}
ORDER = ["decode", "kv", "hybrid", "attention", "serve", "quant", "spec", "parallel", "evict", "guided", "guidellm"]
HEADER = """# Benchmarks

This page is generated: `minfer bench report` writes it from the JSON files in `docs/bench/`.
Do not edit it by hand. To refresh a section, rerun the command shown in it (it rewrites its JSON
file), then `minfer bench report`.

Benchmarks are commands, never tests. They interleave the methods they compare (A, B, A, B, ...) and report
medians of the rounds. On a machine shared with other jobs single figures move between runs: read the ratios
within one table, and the machine line and note under each command.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", default="docs/bench",
                   help="folder of benchmark JSON files (default docs/bench)")
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="the page to write (default docs/benchmarks.md; - prints it)")


def main(args) -> int:
    page = render(load_runs(Path(args.folder)), args.folder)
    if args.out == "-":
        print(page, end="")
    else:
        from minfer.atomic import write_text
        write_text(args.out, page)
        print(f"wrote {args.out}")
    return 0


def load_runs(folder: Path) -> list[dict]:
    """Every ``*.json`` in ``folder``, in ``ORDER`` of their benchmark, then by file name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (the benchmarks' JSON files go there with --json)")
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(run, dict) or not isinstance(run.get("benchmark"), str):
            raise ValueError(f"{path}: not a benchmark result (no \"benchmark\" name)")
        runs.append({**run, "_file": path.name})
    if not runs:
        raise ValueError(f"{folder}: no *.json benchmark results")
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(runs, key=lambda r: (rank.get(_kind(r), len(ORDER)), r["_file"]))


def render(runs: list[dict], folder: str = "docs/bench") -> str:
    return HEADER + "".join(section(run, folder) for run in runs)


def section(run: dict, folder: str = "docs/bench") -> str:
    """One run: its heading, command, machine line, date and note, then its tables."""
    lines = [f"\n## {run['benchmark']} (`{folder.rstrip('/')}/{run['_file']}`)\n", "```",
             run.get("command", "(command not recorded)"),
             "```", "", f"- {machine_line(run)}", f"- date: {run.get('date', 'not recorded')}"]
    if run.get("note"):
        lines.append(f"- note: {run['note']}")
    if settings := _scalars(run):
        lines.append("- settings: " + ", ".join(f"{k} {_cell(v, '{:.4g}')}" for k, v in settings.items()))
    tables = [(title, _rows(run, path), cols) for title, path, cols in TABLES.get(_kind(run), [])]
    tables = [t for t in tables if t[1]]
    if not tables:
        lines += ["", "(no table for this benchmark: its figures are in the JSON file)"]
    for title, rows, cols in tables:
        lines += ["", f"**{title}**", "", markdown_table(rows, cols)]
    return "\n".join(lines) + "\n"


def machine_line(run: dict) -> str:
    m = run.get("machine") or {}
    if not m:
        return "machine: not recorded"
    parts = [m.get("processor", "?"), f"{m.get('cpu_count', '?')} CPUs", f"{m.get('torch_threads', '?')} torch threads",
             f"torch {m.get('torch', '?')}", str(m.get("device", "cpu"))]
    if m.get("gpu"):
        parts.append(m["gpu"])
    if run.get("load_average"):
        parts.append("load average " + " / ".join(f"{x:g}" for x in run["load_average"]))
    return "machine: " + ", ".join(parts)


def markdown_table(rows: list[dict], cols: list[Column]) -> str:
    """A Markdown table of ``rows``: the columns that have a value in some row."""
    cols = [c for c in cols if any(_get(r, c[0]) is not None for r in rows)]
    numeric = [all(isinstance(_get(r, k), (int, float)) and not isinstance(_get(r, k), bool)
                   for r in rows if _get(r, k) is not None) for k, _, _ in cols]
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |",
           "| " + " | ".join("---:" if num else "---" for num in numeric) + " |"]
    out += ["| " + " | ".join(_cell(_get(r, k), fmt) for k, _, fmt in cols) + " |" for r in rows]
    return "\n".join(out)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _get(row: dict, key: str):
    """``row[key]``; a dotted key reads a nested dict (``ttft.median``)."""
    for part in key.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row


def _rows(run: dict, path: str) -> list[dict]:
    """The list of rows at ``path`` (dotted); a dict of dicts becomes rows with their key as ``name``."""
    value = _get(run, path)
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        value = [{"name": k, **v} for k, v in value.items()]
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def _scalars(run: dict) -> dict:
    skip = {"benchmark", "command", "date", "machine", "note", "load_average", "_file"}
    return {k: v for k, v in run.items() if k not in skip and isinstance(v, (int, float, str, bool))}


def _kind(run: dict) -> str:
    """The benchmark's name without its options: "serve --url" -> "serve"."""
    return run["benchmark"].split()[0]
