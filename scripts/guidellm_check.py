"""guidellm against `minfer bench serve --url`: the same workload, the same server, two load generators.

    python scripts/guidellm_check.py --guidellm /path/to/venv/bin/guidellm [--repeats 2]

guidellm (https://github.com/vllm-project/guidellm) is installed in a virtual environment of its
own (`pip install guidellm`); nothing here imports it. The script starts `minfer serve` on a free
port (or uses --url), then runs the two clients in turn (minfer, guidellm, minfer, guidellm, ...)
on one workload: --requests requests sent at once, --prompt-len prompt tokens, --output-len output
tokens with ignore_eos (both clients send it), greedy. It writes docs/bench/guidellm.json, which
`minfer bench report` puts in docs/benchmarks.md. Offline: guidellm reads the tokenizer from the
model folder and makes synthetic prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minfer.cli", "serve", model, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"minfer serve exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit("minfer serve did not answer /health within 300 s")


def run_minfer(url: str, a, model_id: str) -> dict:
    """The HTTP client of `minfer bench serve --url` (minfer/bench/serve_http.py), without its in-process
    rounds and cost section: the same trace of random-token prompts, all at t = 0, and the same summary."""
    from minfer.bench.serve_http import run_http
    from minfer.serving.metrics import summarize
    from minfer.serving.workload import synthetic_trace
    trace = synthetic_trace(a.requests, rate=float("inf"), burstiness=1.0, prompt_len=(a.prompt_len, a.prompt_len),
                            output_len=(a.output_len, a.output_len), vocab=(100, 49152), seed=0)
    stats, duration, _ = run_http(url, trace, model_id)
    tok_s = summarize(stats, duration=duration).output_throughput
    return {"output_tok_s": tok_s, "req_s": len(stats) / duration}


def run_guidellm(url: str, a, model_id: str, tmp: Path) -> dict:
    path = tmp / "guidellm.json"
    cmd = [a.guidellm, "run", "--disable-progress",
           "--backend", f"kind=openai_http,target={url},model={model_id},request_format=/v1/completions",
           "--profile", f"kind=concurrent,streams={a.requests}",
           "--constraint", f"kind=max_requests,count={a.requests}",
           "--data", f"kind=synthetic_text,prompt_tokens={a.prompt_len},output_tokens={a.output_len}",
           "--tokenizer", f"kind=huggingface_auto,model={Path(a.model).absolute()}",
           "--output", f"kind=json,path={path}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    m = json.loads(path.read_text())["benchmarks"][0]["metrics"]
    done = m["request_totals"]["successful"]
    if done != a.requests:
        raise SystemExit(f"guidellm: {done} of {a.requests} requests succeeded (see {path})")
    return {"output_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
            "req_s": m["requests_per_second"]["successful"]["mean"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guidellm", required=True, help="the guidellm executable (its own virtual environment)")
    p.add_argument("--model", default="weights/smollm2-135m-instruct", help="model folder (has tokenizer.json)")
    p.add_argument("--url", default=None, help="a running minfer serve (default: start one)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="docs/bench/guidellm.json")
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sys.path.insert(0, str(ROOT))
    proc, url = start_server(a.model, env) if a.url is None else (None, a.url.rstrip("/"))
    model_id = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    rows, load = [], []
    run_minfer(url, argparse.Namespace(**{**vars(a), "requests": 1}), model_id)     # warm-up, as --url does
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.repeats):
                for tool, run in (("minfer bench serve --url", lambda: run_minfer(url, a, model_id)),
                                  ("guidellm", lambda: run_guidellm(url, a, model_id, Path(tmp)))):
                    load.append(os.getloadavg()[0])
                    rows.append({"tool": tool, "round": r + 1, **run()})
                    print(rows[-1], flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    summary = []
    for tool in dict.fromkeys(r["tool"] for r in rows):
        xs = [r["output_tok_s"] for r in rows if r["tool"] == tool]
        summary.append({"tool": tool, "output_tok_s": statistics.median(xs),
                        "req_s": statistics.median(r["req_s"] for r in rows if r["tool"] == tool),
                        "spread": (max(xs) - min(xs)) / statistics.median(xs)})
    for row in summary:
        row["x_minfer"] = row["output_tok_s"] / summary[0]["output_tok_s"]
    from minfer.bench.timing import write_json
    write_json(a.out, {"benchmark": "guidellm", "command": "python " + " ".join(sys.argv), "model": a.model,
                       "requests": a.requests, "prompt_len": a.prompt_len, "output_len": a.output_len,
                       "load_average_per_run": load, "rounds": rows, "summary": summary})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
