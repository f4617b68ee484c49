"""``minfer batch INPUT.jsonl OUTPUT.jsonl``: an offline batch job in the OpenAI batch file format.
Throughput first: every request goes to the engine at once. A bad body is that line's error
record; a broken file is refused before the model loads. Resumable by content (``request_hash``
in ``OUTPUT.jsonl.partial``), written atomically. The formats and the rules: docs/serving.md.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from minfer.atomic import atomic_write
from minfer.cli_args import add_model_args, positive_int, set_threads
from minfer.sampling import SamplingParams
from minfer.serving.openai_api import (APIError, ChatCompletionRequest, ChoiceShape, CompletionRequest,
                                       choice_shape, parse_body, prompt_ids, response, sampling_params, usage)
from minfer.validation import check_engine_args

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchItem:
    custom_id: str
    url: str
    body: object              # a dict when valid; anything else becomes this line's error record
    line: int
    request_hash: str = ""


def request_hash(method: str, url: str, body: object) -> str:
    """sha256 of the request's method, url and body (canonical JSON: key order and spacing do not count)."""
    canon = json.dumps({"method": method, "url": url, "body": body}, sort_keys=True, ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


# --- Reading the input and the finished records ---
def read_input(path: str | Path) -> list[BatchItem]:
    """Parse the framing of every line (JSON object, custom_id, method, url); ValueError naming the
    line on the first problem. The body is checked later, per request (a bad body -> an error record)."""
    items, seen = [], {}
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder, not a JSONL file")
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 is JSON text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:   # also an integer of more than 4,300 digits
            raise ValueError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})"[:300]) from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise ValueError(f"{where}: custom_id must be a non-empty string")
        if cid in seen:
            raise ValueError(f"{where}: duplicate custom_id {cid!r} (first on line {seen[cid]})")
        seen[cid] = n
        method = obj.get("method", "POST")
        if method != "POST":
            raise ValueError(f"{where}: method must be POST, got {method!r}")
        url = obj.get("url")
        if url not in URLS:
            raise ValueError(f"{where}: url must be one of {URLS}, got {url!r}")
        body = obj.get("body")
        items.append(BatchItem(cid, url, body, n, request_hash(method, url, body)))
    return items


def read_records(path: Path) -> list[dict]:
    """The records of an output file or a journal, in file order (a torn last line, from a kill, is
    ignored); ValueError for anything else, so a file minfer did not write is never overwritten."""
    recs: list[dict] = []
    if not path.exists():
        return recs
    if not path.is_file():
        raise ValueError(f"{path}: is not a regular file")
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                rec = None
            if not (isinstance(rec, dict) and isinstance(rec.get("custom_id"), str) and "response" in rec
                    and "error" in rec):
                if not raw.endswith("\n"):
                    break                  # the write that was cut short by a kill
                raise ValueError(f"{path} line {n} is not a batch output record: {path} was not written "
                                 f"by `minfer batch`; refusing to overwrite it (choose another OUTPUT)")
            recs.append(rec)
    return recs


def check_paths(input_path: str | Path, output_path: str | Path) -> None:
    """Before the model loads: INPUT and OUTPUT (and its journal) are different files, OUTPUT is
    not a folder, its folder is a folder we may write in, and an existing OUTPUT is a batch output."""
    inp, out = Path(input_path).resolve(), Path(output_path).resolve()
    journal = out.with_name(out.name + ".partial")
    if inp in (out, journal) or (out.exists() and inp.exists() and out.samefile(inp)):
        raise ValueError(f"OUTPUT {output_path} is the input file {input_path}; choose another output")
    if out.is_dir():
        raise ValueError(f"OUTPUT {output_path} is a folder; give a file name such as results.jsonl")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"OUTPUT {output_path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"OUTPUT {output_path}: cannot write in {parent} (permission denied)")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"OUTPUT {output_path}: the file is read-only")
    read_records(out)                             # refuses to overwrite a file that is not ours
    read_records(journal)


def _truncate_torn_tail(path: Path) -> None:
    """Cut a journal back to its last complete line, so appends start on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


# --- Requests in, records out ---
def parse_request(item: BatchItem, tokenizer, max_model_len: int) -> tuple[list[int], SamplingParams, ChoiceShape]:
    """A request's prompt ids, sampling parameters and choice shape, by the server's request models
    (``openai_api``: the same fields, limits, defaults and refusals); errors name ``body.<field>``."""
    chat = item.url == "/v1/chat/completions"
    req = parse_body(ChatCompletionRequest if chat else CompletionRequest, item.body, prefix="body.")
    if req.n != 1:
        raise ValueError(f"body.n must be 1 in a batch job (one line per sample), got {req.n}")
    ids = prompt_ids(req, tokenizer)
    params = sampling_params(req, len(ids), max_model_len, chat=chat)
    return ids, params, choice_shape(req, ids, params, tokenizer, chat=chat)


def _record_id(custom_id: str) -> str:
    return hashlib.sha1(custom_id.encode()).hexdigest()[:24]


def success_record(item: BatchItem, req, model_name: str, shape: ChoiceShape) -> dict:
    rid = _record_id(item.custom_id)
    ids = list(req.output_token_ids) if shape.generated else []
    text, logprobs = shape.piece(req.text, ids, req.logprobs, req.prompt_logprobs, True)
    body = response(f"cmpl-{rid}", model_name, item.url == "/v1/chat/completions",
                    [(text, req.finish_reason, logprobs)], usage(req.num_prompt_tokens, len(ids)))
    body["choices"][0]["token_ids"] = ids
    return {"id": f"batch_req_{rid}", "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def error_record(item: BatchItem, message: str) -> dict:
    if not message.startswith("line "):
        message = f"line {item.line} (custom_id {item.custom_id!r}): {message}"
    return {"id": f"batch_req_{_record_id(item.custom_id)}", "custom_id": item.custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}


def run_batch(input_path: str | Path, output_path: str | Path, engine, model_name: str = "minfer",
              progress: bool = True, keep_errors: bool = False, seeded=lambda params: params) -> dict:
    """Run every request of ``input_path`` without an up-to-date record (same custom_id and request hash;
    an error record only with ``keep_errors``), write ``output_path``. ``seeded`` gives a request without
    a seed its seed (``LLM.seeded``). Returns {"total", "skipped" (reused), "ran", "errors" (invalid)}."""
    items = read_input(input_path)
    output_path = Path(output_path)
    check_paths(input_path, output_path)
    journal = output_path.with_name(output_path.name + ".partial")
    wanted = {(it.custom_id, it.request_hash) for it in items}
    done: dict[str, dict] = {}
    for rec in read_records(output_path) + read_records(journal):     # the journal is newer: it wins
        key = (rec["custom_id"], rec.get("request_hash"))
        if key in wanted and (rec["error"] is None or keep_errors):
            done[rec["custom_id"]] = rec
    todo = [it for it in items if it.custom_id not in done]
    _truncate_torn_tail(journal)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="req", disable=not progress)
    tokens = errors = 0
    with open(journal, "a", encoding="utf-8") as jf:
        def finish(item: BatchItem, record: dict) -> None:
            record["request_hash"] = item.request_hash
            jf.write(json.dumps(record, ensure_ascii=False) + "\n")
            jf.flush()                             # one whole line per finished request
            done[item.custom_id] = record
            nonlocal tokens
            tokens += record["response"]["body"]["usage"]["completion_tokens"] if record["response"] else 0
            bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s", refresh=False)
            bar.update()

        by_rid: dict[str, tuple[BatchItem, ChoiceShape]] = {}
        for item in todo:                          # everything goes in at once: throughput first
            try:
                ids, params, shape = parse_request(item, engine.tokenizer, engine.max_model_len)
                rid = engine.add_request(ids, seeded(params))
            except (ValueError, TypeError, APIError) as e:     # this line's error record; the job goes on
                errors += 1
                finish(item, error_record(item, str(e)))
                continue
            by_rid[rid] = item, shape
        engine.no_more_requests(True)
        for delta in engine.stream():
            if delta.finished:
                item, shape = by_rid[delta.request_id]
                finish(item, success_record(item, engine.requests[delta.request_id], model_name, shape))
    bar.close()
    with atomic_write(output_path) as f:                # temp file, fsync, rename (minfer.atomic)
        f.writelines(json.dumps(done[it.custom_id], ensure_ascii=False) + "\n" for it in items)
    journal.unlink(missing_ok=True)
    return {"total": len(items), "skipped": len(items) - len(todo), "ran": len(todo) - errors, "errors": errors}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Run an OpenAI-format batch file (JSONL, one request per line with custom_id)."
    p.add_argument("input", help="INPUT.jsonl")
    p.add_argument("output", help="OUTPUT.jsonl (a rerun resumes from OUTPUT.jsonl.partial)")
    add_model_args(p)
    p.add_argument("--quantization", default=None,
                   help="weight-only quantization: int8 | int4 | int4-gN | q8_0 | q4_0 | q4_1 (default: none; "
                        "a folder written by `minfer quantize` is read as it is)")
    p.add_argument("--max-num-seqs", type=positive_int, default=32, help="requests at once (default 32)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=1024,
                   help="token budget per step (default 1024)")
    p.add_argument("--seed", type=int, default=0,
                   help="a request without a seed draws one from this seeded sequence, as LLM(seed=...) (default 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--keep-errors", action="store_true",
                   help="on a rerun, keep the error records of unchanged lines instead of retrying them")


def main(args) -> int:
    from minfer.llm import LLM
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"{args.input}: no such input file")
    read_input(args.input)                       # a malformed file fails before the model loads
    check_paths(args.input, args.output)         # and so does an output we cannot or must not write
    check_engine_args(device=args.device, seed=args.seed)
    set_threads(args.threads)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,   # the one front door
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    engine = llm.engine
    t0 = time.perf_counter()
    res = run_batch(args.input, args.output, engine, model_name=str(args.model), progress=not args.no_progress,
                    keep_errors=args.keep_errors, seeded=llm.seeded)
    print(f"{res['total']} requests: {res['skipped']} already done, {res['ran']} run, {res['errors']} "
          f"invalid; {time.perf_counter() - t0:.1f} s -> {args.output}", file=sys.stderr)
    return 0
