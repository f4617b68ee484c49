"""Multi-process checks run by the tests, the lesson and ``minfer bench parallel``.
Each ``*_worker(rank, world, ...)`` runs inside ``comm.launch`` on tiny random models, compares the
parallel run with the single-process one on the same rank, and rank 0 ``torch.save``s its findings.
"""
import dataclasses
import os
import random
import time

import torch

from minfer.config import ModelConfig
from minfer.distributed import comm
from minfer.distributed.disagg import decode_worker, prefill_worker
from minfer.distributed.engine import follow_engine, follower_runner, parallel_engine, run_step
from minfer.distributed.pipeline import PipelineStage
from minfer.distributed.tensor_parallel import StateDictSource, build_tp_model
from minfer.engine import LLMEngine
from minfer.engine.request import TraceRequest
from minfer.generate import generate_tokens
from minfer.model import build_model
from minfer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    return ModelConfig(**{**base, **kw})


TP_CASES = {
    "MHA": dict(num_key_value_heads=4),
    "GQA": dict(num_key_value_heads=2),
    "MQA": dict(num_key_value_heads=1),
    "GQA+bias": dict(attention_bias=True),
    "untied": dict(tie_word_embeddings=False),
    "odd vocab": dict(vocab_size=97),
}


def _save(rank: int, out_path, results) -> None:
    if rank == 0:
        torch.save(results, out_path)


def random_model(cfg: ModelConfig, seed: int = 0):
    """A tiny random model whose greedy tokens vary (projections scaled up: plain N(0, 0.02)
    weights make a tied model repeat its last token)."""
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(15.0)
    return model


def compare_tp(cfg: ModelConfig, rank: int, world: int, seed: int = 0, prompt_len: int = 7) -> dict:
    """Logits and greedy tokens of the full model vs this rank's TP shard of it: the single-request
    loop with the contiguous cache, and the engine (paged cache; both ranks schedule alike)."""
    full = random_model(cfg, seed)
    shard = build_tp_model(cfg, StateDictSource(full.state_dict()), rank, world)
    ids = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(prompt_len)[None].expand(2, -1)
    with torch.no_grad():
        want, got = full(ids, pos), shard(ids, pos)
    prompt = ids[0].tolist()
    return {"max_abs_err": float((want - got).abs().max()),
            "tokens_full": list(generate_tokens(full, prompt, GREEDY)),
            "tokens_tp": list(generate_tokens(shard, prompt, GREEDY)),
            "tokens_tp_paged": _engine(shard, max_num_batched_tokens=4).generate([prompt], GREEDY)[0].output_token_ids}


def random_tp_cases(n: int, world: int, seed: int = 0) -> dict:
    """``n`` random configs that split over ``world`` ranks (the same on every rank: seeded)."""
    pick, cases = random.Random(seed).choice, {}
    for i in range(n):
        nkv = pick([1, world, 2 * world])
        nh = nkv * pick([1, 2, 3]) if nkv >= world else world * pick([1, 2])
        hd = pick([4, 8])
        cases[f"random {i}"] = dict(num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
                                    hidden_size=pick([16, 24, 32]), num_hidden_layers=pick([1, 2, 3]),
                                    intermediate_size=world * pick([8, 12]), vocab_size=pick([64, 95]),
                                    attention_bias=pick([False, True]), tie_word_embeddings=pick([False, True]))
    return cases


def tp_worker(rank: int, world: int, out_path, cases=None) -> None:
    results = {}
    for name, kw in (cases or {**TP_CASES, **random_tp_cases(6, world)}).items():
        results[name] = {**compare_tp(tiny_config(**kw), rank, world), "config": kw}
    _save(rank, out_path, results)


# --- Pipeline parallel ---
def pp_worker(rank: int, world: int, out_path, num_microbatches=(1, 2, 4)) -> None:
    """PP=world logits (with 1, 2, 4 micro-batches) and greedy tokens vs the whole model on one rank."""
    results = {}
    for name, kw in {"GQA": {}, "untied": dict(tie_word_embeddings=False, num_hidden_layers=5)}.items():
        cfg = tiny_config(**kw)
        full = random_model(cfg)
        stage = PipelineStage(random_model(cfg), rank, world)
        ids = torch.randint(0, cfg.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(6)[None].expand(4, -1)
        with torch.no_grad():
            want = full(ids, pos)
            errs = {m: float((stage(ids, pos, num_microbatches=m) - want).abs().max()) for m in num_microbatches}
        prompt = ids[0].tolist()
        results[name] = {"max_abs_err": errs, "layers": list(stage.layer_ids),
                         "tokens_full": list(generate_tokens(full, prompt, GREEDY)),
                         "tokens_pp": list(generate_tokens(stage, prompt, GREEDY))}
    _save(rank, out_path, results)


# --- Prefill/decode disaggregation ---
def mixed_trace(n: int, seed: int, vocab: int, prefix_len: int = 12, max_prompt: int = 30):
    """Random prompts, half of them sharing a prefix (prefix-cache hits), random lengths."""
    rng, vocab_ids = random.Random(seed), range(vocab)
    prefix, trace = rng.choices(vocab_ids, k=prefix_len), []
    for i in range(n):
        tail = rng.choices(vocab_ids, k=rng.randint(1, max_prompt - prefix_len - 1))
        prompt = prefix + tail if i % 2 else rng.choices(vocab_ids, k=len(tail) + 3)
        trace.append(TraceRequest(f"r{i}", 0.0, prompt, rng.randint(1, 8)))
    return trace


def _engine(model, **kw):
    return LLMEngine.from_model(model, **{"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 64,
                                          "eos_token_ids": (), **kw})


def greedy_params(r):
    return SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)


def _seeded_params(r):
    return SamplingParams(temperature=0.8, top_p=0.9, seed=int(r.request_id[1:]), max_tokens=r.max_tokens,
                          ignore_eos=True)


def disagg_worker(rank: int, world: int, out_path, seeds=(0, 1, 2)) -> None:
    """Rank 0 prefills, rank 1 decodes; rank 0 then runs the same requests on one engine and compares."""
    cfg = tiny_config()
    results = {}
    for seed in seeds:
        for kind, make in (("greedy", greedy_params), ("seeded", _seeded_params)):
            trace = mixed_trace(6, seed, cfg.vocab_size)
            engine = _engine(random_model(cfg), max_num_batched_tokens=16)   # prompts over several steps
            if rank == 0:
                prefill_worker(engine, trace, make)
                got = comm.recv_object(1)
                ref = _engine(random_model(cfg)).generate([r.prompt_token_ids for r in trace],
                                                         [make(r) for r in trace])
                results[(seed, kind)] = {
                    "want": {r.request_id: q.output_token_ids for r, q in zip(trace, ref)},
                    "got": {rid: v[0] for rid, v in got.items()},
                    "prefix_hit_tokens": engine.prefix_cache_stats[1]}
            else:
                comm.send_object(decode_worker(engine), 0)
    _save(rank, out_path, results)


# --- A rank that dies ---
def dying_rank_worker(rank: int, world: int, out_path, die_after: int = 3) -> None:
    """Rank 1 follows the driver for ``die_after`` steps, then exits. Rank 0 must get a DistributedError
    (not hang); it records the message, how long it waited and the in-flight requests' finish reasons."""
    cfg = tiny_config()
    shard = build_tp_model(cfg, StateDictSource(random_model(cfg).state_dict()), rank, world)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    if rank == 1:
        runner = follower_runner(shard)
        for _ in range(die_after):
            run_step(runner, comm.broadcast_object(None))
        os._exit(0)                                           # no goodbye: the process is gone
    engine = parallel_engine(shard, num_blocks=64, block_size=4, eos_token_ids=())
    t0, got, error, reasons = time.perf_counter(), [], None, None   # (building may compile the decode kernel)
    try:
        for p in ([1, 2, 3], [4, 5, 6, 7]):
            engine.add_request(p, params)
        for out in engine.stream():
            got.extend(out.new_token_ids)
    except comm.DistributedError as e:
        error = str(e)
        reasons = [r.finish_reason for r in engine.requests.values()]
    _save(rank, out_path, {"error": error, "tokens": got, "seconds": time.perf_counter() - t0,
                           "finish_reasons": reasons})


def many_worker(rank: int, world: int, out_path, jobs) -> None:
    """Run ``jobs`` = [(name, worker, args), ...] in one process group; rank 0 saves {name: what it saved}."""
    results = {}
    for name, worker, args in jobs:
        part = f"{out_path}.{name}"
        worker(rank, world, part, *args)
        if rank == 0:
            results[name] = torch.load(part, weights_only=False)
            os.remove(part)
    _save(rank, out_path, results)


def all_checks_worker(rank: int, world: int, out_path) -> None:
    """The test suite's TP, PP and disaggregation checks, in one process group."""
    many_worker(rank, world, out_path, [("tp", tp_worker, ()), ("engine", engine_worker, ()),
                                        ("pp", pp_worker, ()), ("disagg", disagg_worker, ())])


def _tokens_and_logprobs(reqs) -> tuple[list, list]:
    """Each request's output tokens; every prompt and sampled logprob of those that asked, in one list."""
    lps = [d[t].logprob for q in reqs if q.logprobs is not None
           for d, t in zip(q.prompt_logprobs[1:] + q.logprobs, q.all_token_ids[1:])]
    return [q.output_token_ids for q in reqs], lps


def engine_worker(rank: int, world: int, out_path, seeds=(0, 1)) -> None:
    """The engine driven by rank 0 and followed by rank 1, on TP shards and pipeline stages, vs one engine."""
    cfg = tiny_config()
    results = {}
    for seed in seeds:
        trace = mixed_trace(6, seed, cfg.vocab_size)
        prompts = [r.prompt_token_ids for r in trace]
        params = [dataclasses.replace(greedy_params(r), logprobs=2, prompt_logprobs=1) if i % 2
                  else greedy_params(r) for i, r in enumerate(trace)]      # half of them ask for logprobs
        full = random_model(cfg, seed)
        if rank == 0:
            want, want_lp = _tokens_and_logprobs(_engine(full, max_num_batched_tokens=24).generate(prompts, params))
        setups = {"tp": (lambda: build_tp_model(cfg, StateDictSource(full.state_dict()), rank, world), 1),
                  "pp": (lambda: PipelineStage(random_model(cfg, seed), rank, world), 1),
                  "pp, 2 micro-batches": (lambda: PipelineStage(random_model(cfg, seed), rank, world), 2)}
        for name, (make, m) in setups.items():
            model = make()
            if rank == 0:
                engine = parallel_engine(model, num_microbatches=m, num_blocks=64, block_size=4,
                                         max_num_batched_tokens=24, eos_token_ids=())
                got, lp = _tokens_and_logprobs(engine.generate(prompts, params))
                engine.runner.shutdown()
                timeline = getattr(model, "timeline", [])
                results[(seed, name)] = {"want": want, "got": got, "steps": engine.num_steps,
                                         "logprob_err": (torch.tensor(lp) - torch.tensor(want_lp)).abs().max().item(),
                                         "microbatches": 1 + max((t[0] for t in timeline), default=0)}
            else:
                follow_engine(model)
    _save(rank, out_path, results)
