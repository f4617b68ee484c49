"""Measurements behind ``minfer bench parallel`` and lesson 11, each a ``comm.launch`` worker that interleaves
single-process and parallel runs (rank 1 waits in a barrier while rank 0 times alone); rank 0 saves medians.
"""
import statistics
import time

import torch

from minfer.config import ModelConfig
from minfer.distributed import comm
from minfer.distributed.checks import greedy_params, random_model
from minfer.distributed.tensor_parallel import StateDictSource, build_tp_model
from minfer.generate import generate_tokens
from minfer.sampling import SamplingParams

SMOLLM2_LIKE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=72, intermediate_size=1536, max_position_embeddings=2048)


def _decode_time(model, prompt, n_tokens) -> dict:
    """Prefill seconds, seconds per decoded token, and (from the first token on) what the
    decode steps sent: calls and bytes per token, seconds inside collectives per token."""
    times, t0 = [], time.perf_counter()
    for _ in generate_tokens(model, prompt, SamplingParams(temperature=0.0, max_tokens=n_tokens + 1,
                                                           ignore_eos=True)):
        times.append(time.perf_counter())
        if len(times) == 1:
            comm.COMM_STATS.reset()                               # count the decode steps only
    s = comm.COMM_STATS
    return {"prefill_s": times[0] - t0, "tpot_s": (times[-1] - times[0]) / n_tokens,
            "all_reduce_calls_per_token": s.calls.get("all_reduce", 0) / n_tokens,
            "all_reduce_bytes_per_token": s.bytes.get("all_reduce", 0) / n_tokens,
            "all_gather_bytes_per_token": s.bytes.get("all_gather", 0) / n_tokens,
            "comm_s_per_token": sum(s.seconds.values()) / n_tokens}


def tp_decode_worker(rank, world, out_path, cfg_kwargs=None, prompt_len=64, n_tokens=16, rounds=3) -> None:
    cfg = ModelConfig(**(cfg_kwargs or SMOLLM2_LIKE))
    full = random_model(cfg)
    shard = build_tp_model(cfg, StateDictSource(full.state_dict()), rank, world)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = {"1 rank": [], f"{world} ranks (TP)": []}
    for r in range(rounds + 1):                                    # round 0 is the warm-up
        comm.barrier()
        if rank == 0:
            single = _decode_time(full, prompt, n_tokens)
        comm.barrier()
        tp = _decode_time(shard, prompt, n_tokens)
        if r and rank == 0:
            rows["1 rank"].append(single)
            rows[f"{world} ranks (TP)"].append(tp)
    if rank == 0:
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
        torch.save({"config": cfg_kwargs or SMOLLM2_LIKE, "prompt_len": prompt_len, "n_tokens": n_tokens,
                    "world": world, "timing": med}, out_path)


def pp_bubble_worker(rank, world, out_path, cfg_kwargs=None, batch=8, seq=32, microbatches=(1, 2, 4, 8)) -> None:
    """Per micro-batch count: every stage's (micro-batch, start, end) compute intervals of one forward."""
    from minfer.distributed.pipeline import PipelineStage
    cfg = ModelConfig(**(cfg_kwargs or {**SMOLLM2_LIKE, "num_hidden_layers": 8, "vocab_size": 4096}))
    stage = PipelineStage(random_model(cfg), rank, world)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq)[None].expand(batch, -1)
    results = {}
    for m in (1, *microbatches):                                   # the first is a warm-up
        comm.barrier()
        stage.timeline.clear()
        t0 = time.perf_counter()
        stage(ids, pos, num_microbatches=m)
        span = time.perf_counter() - t0
        timeline = [(mb, s - t0, e - t0) for mb, s, e in stage.timeline]
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, (timeline, span))
        spans = max(s for _, s in everyone)
        busy = sum(e - s for tl, _ in everyone for _, s, e in tl)
        results[m] = {"timelines": [tl for tl, _ in everyone], "seconds": spans,
                      "idle_fraction": 1 - busy / (world * spans)}
    if rank == 0:
        torch.save(results, out_path)


def mixed_workload(vocab, n_short=8, short_prompt=16, short_out=48, n_long=3, long_prompt=384, long_out=4,
                   long_every_s=0.6, seed=0):
    """Short chats decoding steadily while long prompts (documents) arrive every ``long_every_s``."""
    from minfer.engine.request import TraceRequest
    g = torch.Generator().manual_seed(seed)

    def rand(k):
        return torch.randint(0, vocab, (k,), generator=g).tolist()
    trace = [TraceRequest(f"s{i}", 0.0, rand(short_prompt), short_out) for i in range(n_short)]
    trace += [TraceRequest(f"l{i}", 0.3 + i * long_every_s, rand(long_prompt), long_out) for i in range(n_long)]
    return trace


def _summary(results: dict) -> dict:
    """results: rid -> (tokens, arrival, token times, reason) -> TTFT, TPOT, gaps between tokens (ms); a
    short request's first gap (disaggregated: the KV hand-off) apart from the later ones (ITL)."""
    def pct(xs, p):
        return float(torch.tensor(xs).quantile(p)) * 1000 if xs else float("nan")
    short = [v for k, v in results.items() if k.startswith("s")]
    long = [v for k, v in results.items() if k.startswith("l")]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for _, _, t, _ in short if len(t) > 1]
    gaps = [b - a for _, _, t, _ in short for a, b in zip(t[1:], t[2:])]   # steady decoding
    return {"ttft_long_p50_ms": pct([t[0] - a for _, a, t, _ in long], 0.5),
            "ttft_short_p50_ms": pct([t[0] - a for _, a, t, _ in short], 0.5),
            "first_gap_p50_ms": pct([t[1] - t[0] for _, _, t, _ in short if len(t) > 1], 0.5),
            "tpot_short_p50_ms": pct(tpot, 0.5), "itl_short_p99_ms": pct(gaps, 0.99),
            "itl_short_max_ms": max(gaps) * 1000}


def disagg_bench_worker(rank, world, out_path, cfg_kwargs=None, rounds=2, trace_kwargs=None) -> None:
    """Colocated (one engine on rank 0) vs disaggregated (rank 0 prefills, rank 1 decodes), interleaved."""
    from minfer.distributed.disagg import decode_worker, prefill_worker
    from minfer.engine import LLMEngine, run_trace
    cfg = ModelConfig(**(cfg_kwargs or dict(vocab_size=4096, hidden_size=256, num_hidden_layers=8,
                                            num_attention_heads=8, num_key_value_heads=4,
                                            intermediate_size=768, max_position_embeddings=1024)))
    model = random_model(cfg)
    trace = mixed_workload(cfg.vocab_size, **(trace_kwargs or {}))

    def engine():
        return LLMEngine.from_model(model, num_blocks=512, block_size=16, max_num_batched_tokens=512,
                                    eos_token_ids=())
    rows = {"colocated": [], "disaggregated": []}
    for r in range(rounds):
        comm.barrier()
        if rank == 0:
            reqs, _ = run_trace(engine(), trace, greedy_params)
            rows["colocated"].append(_summary({q.request_id: (q.output_token_ids, q.arrival_time,
                                                              q.stats.token_times, q.finish_reason) for q in reqs}))
        comm.barrier()
        if rank == 0:
            prefill_worker(engine(), trace, greedy_params)
            rows["disaggregated"].append(_summary(comm.recv_object(1)))
        else:
            comm.send_object(decode_worker(engine()), 0)
    if rank == 0:
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
        torch.save({"summary": med, "trace": [(t.request_id, t.arrival_time, len(t.prompt_token_ids), t.max_tokens)
                                              for t in trace]}, out_path)
