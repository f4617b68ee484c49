"""``minfer batch INPUT.jsonl OUTPUT.jsonl``: an offline batch job in the OpenAI batch file format.

Online serving puts latency first; a batch job puts throughput first: every
request is known up front, so all of them go to the engine at once and
continuous batching keeps the batch full until the file is done (providers
sell this at about half price).

Input, one request per line (the OpenAI Batch API format)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 64, "temperature": 0}}
    {"custom_id": "q2", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "Once upon a time", "max_tokens": 32, "seed": 7}}

Output, one line per request, in input order::

    {"id": "batch_req_...", "custom_id": "q1", "error": null,
     "response": {"status_code": 200, "request_id": "...",
                  "body": {"object": "chat.completion", "choices": [{"index": 0,
                           "message": {"role": "assistant", "content": "..."},
                           "finish_reason": "stop", "token_ids": [...]}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}}}

A request the engine refuses (prompt too long, bad sampling field) gets a
line with ``"response": null, "error": {"code": "invalid_request", "message": ...}``;
a malformed file (bad JSON, missing or duplicate ``custom_id``, unknown url)
is refused before any work starts, naming the line.

Resumable, nothing lost or duplicated: each finished request is appended to
``OUTPUT.jsonl.partial`` (one flushed line each). A killed job leaves that
journal behind; a rerun reads it (dropping a torn last line), skips the ids
already done and runs only the rest. When every id is done, the final file is
written to a temporary name and renamed over ``OUTPUT.jsonl`` (atomic: a reader
sees the old file or the complete new one), and the journal is removed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from minfer.atomic import atomic_write
from minfer.cli_args import add_model_args
from minfer.sampling import SamplingParams

URLS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_MAX_TOKENS = 256


@dataclass
class BatchItem:
    custom_id: str
    url: str
    body: dict
    line: int


# ---------------------------------------------------------------------------
# Reading the input and the finished records
# ---------------------------------------------------------------------------


def read_input(path: str | Path) -> list[BatchItem]:
    """Parse and check the whole input file; ValueError naming the line on the first problem."""
    items, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object")
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                raise ValueError(f"{where}: custom_id must be a non-empty string")
            if cid in seen:
                raise ValueError(f"{where}: duplicate custom_id {cid!r} (first on line {seen[cid]})")
            seen[cid] = n
            if obj.get("method", "POST") != "POST":
                raise ValueError(f"{where}: method must be POST, got {obj.get('method')!r}")
            url = obj.get("url")
            if url not in URLS:
                raise ValueError(f"{where}: url must be one of {URLS}, got {url!r}")
            body = obj.get("body")
            if not isinstance(body, dict):
                raise ValueError(f"{where}: body must be a JSON object")
            key = "messages" if url == "/v1/chat/completions" else "prompt"
            if key not in body:
                raise ValueError(f"{where}: body.{key} is required for {url}")
            items.append(BatchItem(cid, url, body, n))
    return items


def read_records(path: Path) -> dict[str, dict]:
    """custom_id -> output record, from a finished output file or a journal (torn last line ignored)."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if not raw.endswith("\n"):
                break                      # the write that was cut short by a kill
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            done[rec["custom_id"]] = rec
    return done


def _truncate_torn_tail(path: Path) -> None:
    """Cut a journal back to its last complete line, so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))


def write_atomic(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``path`` atomically (``minfer.atomic``: temp file, fsync, rename)."""
    with atomic_write(path) as f:
        f.writelines(lines)


# ---------------------------------------------------------------------------
# Requests in, records out
# ---------------------------------------------------------------------------


def sampling_params(body: dict) -> SamplingParams:
    """OpenAI body fields -> SamplingParams (ValueError naming the field)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    fields = dict(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                  top_k=body.get("top_k", 0), max_tokens=max_tokens, seed=body.get("seed"),
                  stop=body.get("stop"), ignore_eos=bool(body.get("ignore_eos", False)))
    if body.get("n", 1) != 1:
        raise ValueError(f"body.n must be 1, got {body.get('n')!r}")
    for name in ("temperature", "top_p"):
        if not isinstance(fields[name], (int, float)):
            raise ValueError(f"body.{name} must be a number, got {fields[name]!r}")
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise ValueError(str(e).replace("SamplingParams.", "body.")) from None


def prompt_of(item: BatchItem, tokenizer) -> str:
    if item.url == "/v1/chat/completions":
        return tokenizer.apply_chat_template(item.body["messages"], add_generation_prompt=True)
    prompt = item.body["prompt"]
    if not isinstance(prompt, str):
        raise ValueError("body.prompt must be a string")
    return prompt


def _record_id(custom_id: str) -> str:
    return hashlib.sha1(custom_id.encode()).hexdigest()[:24]


def success_record(item: BatchItem, req, model_name: str) -> dict:
    rid = _record_id(item.custom_id)
    choice = {"index": 0, "finish_reason": req.finish_reason, "token_ids": list(req.output_token_ids)}
    if item.url == "/v1/chat/completions":
        obj = "chat.completion"
        choice["message"] = {"role": "assistant", "content": req.text}
    else:
        obj = "text_completion"
        choice["text"] = req.text
    usage = {"prompt_tokens": req.num_prompt_tokens, "completion_tokens": req.num_output_tokens,
             "total_tokens": req.num_prompt_tokens + req.num_output_tokens}
    body = {"id": f"cmpl-{rid}", "object": obj, "created": int(time.time()), "model": model_name,
            "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{rid}", "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def error_record(item: BatchItem, message: str) -> dict:
    return {"id": f"batch_req_{_record_id(item.custom_id)}", "custom_id": item.custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}


class Progress:
    """A one-line progress bar on stderr: [#####.....] 50/100  12.3 req/s  456 tok/s."""

    def __init__(self, total: int, done: int, enabled: bool = True, stream=sys.stderr):
        self.total, self.done, self.enabled, self.stream = total, done, enabled, stream
        self.start, self.tokens, self.new = time.perf_counter(), 0, 0

    def update(self, tokens: int) -> None:
        self.done += 1
        self.new += 1
        self.tokens += tokens
        if self.enabled:
            el = max(time.perf_counter() - self.start, 1e-9)
            width = 30
            fill = int(width * self.done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total}  "
                              f"{self.new / el:.2f} req/s  {self.tokens / el:.1f} tok/s ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def run_batch(input_path: str | Path, output_path: str | Path, engine, model_name: str = "minfer",
              progress: bool = True) -> dict:
    """Run every not-yet-done request of ``input_path`` on ``engine``; write ``output_path``.

    Returns counts: {"total", "skipped" (done before), "ran", "errors"}.
    """
    items = read_input(input_path)
    output_path = Path(output_path)
    journal = output_path.with_name(output_path.name + ".partial")
    ids = {it.custom_id for it in items}
    done = {k: v for k, v in read_records(output_path).items() if k in ids}
    done.update({k: v for k, v in read_records(journal).items() if k in ids})
    todo = [it for it in items if it.custom_id not in done]
    _truncate_torn_tail(journal)
    bar = Progress(len(items), len(items) - len(todo), enabled=progress)
    errors = 0
    with open(journal, "a", encoding="utf-8") as jf:
        def finish(item: BatchItem, record: dict) -> None:
            jf.write(json.dumps(record, ensure_ascii=False) + "\n")
            jf.flush()                             # one whole line per finished request
            done[item.custom_id] = record
            tokens = record["response"]["body"]["usage"]["completion_tokens"] if record["response"] else 0
            bar.update(tokens)

        by_rid: dict[str, BatchItem] = {}
        for item in todo:                          # everything goes in at once: throughput first
            try:
                params = sampling_params(item.body)
                rid = engine.add_request(prompt_of(item, engine.tokenizer), params)
            except ValueError as e:
                errors += 1
                finish(item, error_record(item, str(e)))
                continue
            by_rid[rid] = item
        engine.no_more_requests(True)
        for delta in engine.stream():
            if delta.finished:
                item = by_rid[delta.request_id]
                finish(item, success_record(item, engine.requests[delta.request_id], model_name))
    bar.close()
    write_atomic(output_path, [json.dumps(done[it.custom_id], ensure_ascii=False) + "\n" for it in items])
    journal.unlink(missing_ok=True)
    return {"total": len(items), "skipped": len(items) - len(todo), "ran": len(todo) - errors, "errors": errors}


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Run an OpenAI-format batch file (JSONL, one request per line with custom_id)."
    p.add_argument("input", help="INPUT.jsonl")
    p.add_argument("output", help="OUTPUT.jsonl (a rerun resumes from OUTPUT.jsonl.partial)")
    add_model_args(p)
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step (default 1024)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from minfer.checkpoints import load_checkpoint
    from minfer.llm import resolve_device, resolve_dtype
    from minfer.model import build_model
    from minfer.serving.engine import LLMEngine

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"{args.input}: no such input file")
    read_input(args.input)                       # a malformed file fails before the model loads
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    cfg, sd, tok = load_checkpoint(args.model, dtype=dtype, device="cpu")
    model = build_model(cfg, sd, device=device, dtype=dtype)
    engine = LLMEngine.from_model(model, tok, policy="continuous", max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens)
    t0 = time.perf_counter()
    res = run_batch(args.input, args.output, engine, model_name=str(args.model), progress=not args.no_progress)
    print(f"{res['total']} requests: {res['skipped']} already done, {res['ran']} run, {res['errors']} "
          f"invalid; {time.perf_counter() - t0:.1f} s -> {args.output}", file=sys.stderr)
    return 0
