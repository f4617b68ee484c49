"""The serving engine on real (tiny, random) models: batching never changes a request's tokens.

Oracle: the same request run alone through ``generate_tokens`` (contiguous KV
cache, no batching). Greedy tokens must be identical under every policy, with
random arrival orders, token budgets, chunk sizes, pool sizes and forced
preemptions; sampled tokens with a per-request seed too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minfer.generate import generate_tokens
from minfer.sampling import SamplingParams
from minfer.serving.batch_job import read_input, run_batch
from minfer.engine import LLMEngine
from minfer.engine.scheduler import POLICIES
from tiny import first_difference, tiny_config, tiny_configs, tiny_model

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.py


# ---------------------------------------------------------------- a tiny byte-level tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer_json() -> str:
    """256 byte tokens + 3 specials, no merges: every byte is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


TOKENIZER_CONFIG = {"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}


@pytest.fixture(scope="module")
def byte_tok():
    from minfer.tokenizer import Tokenizer
    return Tokenizer.from_json(byte_tokenizer_json(), TOKENIZER_CONFIG)


@pytest.fixture(scope="module")
def text_model():
    cfg = tiny_config(vocab_size=259, max_position_embeddings=256)
    return tiny_model(cfg, seed=1)


def alone(model, prompt, params, eos=()):
    return list(generate_tokens(model, prompt, params, eos_token_ids=eos))


# ---------------------------------------------------------------- batching keeps the math


@st.composite
def serving_cases(draw):
    cfg = draw(tiny_configs(sharing=False))
    n = draw(st.integers(1, 6))
    prompts = [draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=1, max_size=30)) for _ in range(n)]
    max_tokens = [draw(st.integers(1, 12)) for _ in range(n)]
    block_size = draw(st.sampled_from([1, 4, 8]))
    biggest = max(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens))
    return dict(
        cfg=cfg, prompts=prompts, max_tokens=max_tokens, block_size=block_size,
        num_blocks=biggest + draw(st.integers(0, 3 * biggest)),     # often too small: preemptions
        budget=draw(st.integers(1, 40)), chunk=draw(st.none() | st.integers(1, 16)),
        max_num_seqs=draw(st.integers(1, 6)),
        order=draw(st.permutations(range(n))),
        # interleaving: for each request, steps to run before adding it; then random forced preemptions
        gaps=[draw(st.integers(0, 3)) for _ in range(n)],
        preempt_at=draw(st.sets(st.integers(0, 30), max_size=4)),
        seed=draw(st.integers(0, 1000)),
        mode=draw(st.sampled_from(["split", "split", "online"])),   # paged attention path
    )


def run_case(case, policy, params):
    model = tiny_model(case["cfg"], seed=case["seed"])
    eng = LLMEngine.from_model(model, policy=policy, max_num_seqs=case["max_num_seqs"],
                               max_num_batched_tokens=case["budget"], max_prefill_chunk=case["chunk"],
                               block_size=case["block_size"], num_blocks=case["num_blocks"], max_wait_ms=0.0,
                               attention_mode=case["mode"])
    ids = {}
    for i in case["order"]:
        for _ in range(case["gaps"][i]):
            eng.step()
        ids[i] = eng.add_request(case["prompts"][i], params[i])
    eng.no_more_requests()
    step = 0
    while eng.has_unfinished_requests():
        if step in case["preempt_at"] and eng.scheduler.running:
            eng.scheduler.preempt(eng.scheduler.running[-1])       # forced preemption
        eng.step()
        step += 1
    return model, [eng.requests[ids[i]] for i in range(len(case["prompts"]))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=serving_cases(), policy=st.sampled_from(POLICIES))
def test_greedy_identical_alone_and_batched(case, policy):
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in case["max_tokens"]]
    model, reqs = run_case(case, policy, params)
    for i, r in enumerate(reqs):
        want = alone(model, case["prompts"][i], params[i])
        assert r.output_token_ids == want, f"request {i} ({policy}): {first_difference(r.output_token_ids, want)}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=serving_cases(), policy=st.sampled_from(POLICIES))
def test_sampled_with_seed_independent_of_batch(case, policy):
    params = [SamplingParams(temperature=0.8 + 0.1 * i, top_p=0.9, top_k=20 * (i % 2), max_tokens=m,
                             seed=case["seed"] + i, ignore_eos=True) for i, m in enumerate(case["max_tokens"])]
    model, reqs = run_case(case, policy, params)
    for i, r in enumerate(reqs):
        want = alone(model, case["prompts"][i], params[i])
        assert r.output_token_ids == want, f"request {i} ({policy}): {first_difference(r.output_token_ids, want)}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=tiny_configs(sharing=False), bs=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16),
       lengths=st.lists(st.integers(1, 60), min_size=1, max_size=5))
def test_split_attention_equals_online(cfg, bs, seed, lengths):
    """The split plan (decodes in one call, prefill chunks alone; SDPA or reference dense backend) =
    the online teaching version (each sequence walks its own blocks), all logits."""
    import random
    from tiny import batch_of
    from minfer.kv.block_pool import BlockPool, KVCacheManager
    from minfer.kv.paged import PagedKVCache
    rng = random.Random(seed)
    model = tiny_model(cfg, seed=seed % 100)
    blocks = 5 * 60                                   # room for every sequence even with blocks of 1
    mgr = KVCacheManager(BlockPool(blocks, bs, enable_prefix_caching=False))
    caches = [PagedKVCache(cfg, blocks, bs, attention_mode="online"), PagedKVCache(cfg, blocks, bs),
              PagedKVCache(cfg, blocks, bs, attention="reference")]
    seqs = {i: [rng.randrange(cfg.vocab_size) for _ in range(n)] for i, n in enumerate(lengths)}
    for i, toks in seqs.items():
        assert mgr.allocate(i, toks) is not None
    done = {i: 0 for i in seqs}
    while any(done[i] < len(seqs[i]) for i in seqs):
        # a random mix: some sequences get a prefill chunk, some a single token (a decode), some nothing
        live = [i for i in seqs if done[i] < len(seqs[i])]
        pick = [i for i in live if rng.random() < 0.7] or live[:1]
        chunks = [(i, done[i], rng.choice([1, rng.randint(1, len(seqs[i]) - done[i])])) for i in pick]
        meta = batch_of(mgr, chunks)
        ids = torch.tensor([[t for i, s0, n in chunks for t in seqs[i][s0:s0 + n]]])
        outs = []
        for cache in caches:
            cache.set_batch(meta)
            outs.append(model(ids, meta.positions, kv_cache=cache))
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
        for i, s0, n in chunks:
            done[i] = s0 + n


def test_static_and_continuous_agree_with_eos_and_preemption():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (10,), generator=g)]
    sp = SamplingParams(temperature=0, max_tokens=25)
    eos = [5, 17]
    want = [alone(model, p, sp, eos) for p in prompts]
    for policy in POLICIES:
        eng = LLMEngine.from_model(model, policy=policy, max_num_seqs=4, max_num_batched_tokens=16,
                                   block_size=4, num_blocks=20, eos_token_ids=eos)
        got = eng.generate(prompts, sp)
        assert [r.output_token_ids for r in got] == want, policy
        assert sum(r.num_preemptions for r in got) > 0, "the pool should have been too small"
        assert eng.runner.kv_manager.seqs == {}


# ---------------------------------------------------------------- engine API


def test_streaming_deltas_and_stop_strings(text_model, byte_tok):
    eng = LLMEngine.from_model(text_model, byte_tok, max_num_batched_tokens=8, block_size=4)
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    a = eng.add_request("hello world", plain)
    full = alone(text_model, byte_tok.encode("hello world"), plain)
    stop_str = byte_tok.decode(full[10:13])               # a string the output will contain
    b = eng.add_request("hello world", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      stop=[stop_str]))
    pieces = {a: [], b: []}
    tokens = {a: [], b: []}
    for d in eng.stream():
        pieces[d.request_id].append(d.new_text)
        tokens[d.request_id] += d.new_token_ids
    ra, rb = eng.requests[a], eng.requests[b]
    assert ra.output_token_ids == tokens[a] == full
    assert "".join(pieces[a]) == ra.text == byte_tok.decode(full)
    assert rb.finish_reason == "stop" and stop_str not in rb.text
    assert "".join(pieces[b]) == rb.text
    assert byte_tok.decode(full).startswith(rb.text)
    assert ra.finish_reason == "length"


def test_abort_frees_blocks_and_others_continue():
    model = tiny_model(tiny_config(), seed=0)
    eng = LLMEngine.from_model(model, block_size=4, num_blocks=40)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    a = eng.add_request([1, 2, 3, 4, 5], sp)
    b = eng.add_request([6, 7, 8], sp)
    eng.step()
    eng.abort(a)
    assert eng.requests[a].finish_reason == "abort"
    assert a not in eng.runner.kv_manager.seqs
    eng.run()
    assert eng.requests[b].output_token_ids == alone(model, [6, 7, 8], sp)
    assert eng.runner.kv_manager.pool.num_free_blocks == 40


def test_engine_state_api_counts_and_release():
    """What a server reads: running/waiting, KV blocks, prefix-cache counters, release of finished requests."""
    model = tiny_model(tiny_config(), seed=0)
    eng = LLMEngine.from_model(model, block_size=4, num_blocks=40, max_num_seqs=2)
    assert eng.kv_cache_usage == (0, 40) and eng.prefix_cache_stats == (0, 0)
    sp = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=3, n=3)
    a = eng.add_request(list(range(1, 10)), sp)                            # 9 tokens: 2 full blocks
    eng.add_request([5, 6], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    c = eng.add_request([7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert (eng.num_running, eng.num_waiting) == (0, 3)
    eng.step()                                                             # a forks into 3; b joins
    assert (eng.num_running, eng.num_waiting) == (4, 1)
    assert eng.kv_cache_usage[0] > 0
    assert eng.release(a) is None                                         # unfinished: kept
    assert eng.abort(c) and not eng.abort(c) and not eng.abort("nobody")
    eng.run()
    samples = eng.release(a)
    assert [r.index for r in samples] == [0, 1, 2] and all(r.num_output_tokens == 6 for r in samples)
    assert a not in eng.samples and not any(r.request_id in eng.requests for r in samples)
    assert eng.release(a) is None and eng.kv_cache_usage == (0, 40) and eng.num_running == 0
    queries, hits = eng.prefix_cache_stats
    assert (queries, hits) == (9 + 2, 0)                                   # c was aborted while waiting
    eng.add_request(list(range(1, 10)) + [42], SamplingParams(temperature=0, max_tokens=1))
    eng.run()
    assert eng.prefix_cache_stats == (queries + 10, 8)                    # a's 2 full blocks were cached


def test_bad_requests_name_the_field():
    model = tiny_model(tiny_config(max_position_embeddings=64), seed=0)
    eng = LLMEngine.from_model(model, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        eng.add_request([1, 200])
    with pytest.raises(ValueError, match="context is 64 tokens"):
        eng.add_request([1] * 64)
    with pytest.raises(ValueError, match="num_blocks=8"):
        eng.add_request([1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="needs an engine with a tokenizer"):
        eng.add_request("text")
    eng.add_request([1], request_id="x")
    with pytest.raises(ValueError, match="already added"):
        eng.add_request([1], request_id="x")
    with pytest.raises(ValueError, match="policy must be one of"):
        LLMEngine.from_model(model, policy="fifo")


# ---------------------------------------------------------------- the batch job


def write_batch_file(path: Path, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        k = int(torch.randint(3, 30, (1,), generator=g))
        words = " ".join(f"w{int(x)}" for x in torch.randint(0, 50, (k,), generator=g))
        if i % 2:
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": words}], "max_tokens": 8 + i % 9,
                             "temperature": 0}}
        else:
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": words, "max_tokens": 8 + i % 7, "temperature": 0}}
        lines.append(line)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def online_outputs(model, tok, lines, num_blocks: int | None = None) -> dict[str, list[int]]:
    """The online engine, one request at a time as they 'arrive'."""
    out = {}
    for x in lines:
        body = x["body"]
        prompt = (tok.apply_chat_template(body["messages"]) if "messages" in body else body["prompt"])
        eng = LLMEngine.from_model(model, tok, block_size=4, num_blocks=num_blocks)
        out[x["custom_id"]] = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=body["max_tokens"]))[0]
    return out


def test_batch_job_matches_online_engine_and_resumes(tmp_path, text_model, byte_tok):
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = write_batch_file(inp, 12)
    # A previous run "killed" after 4 requests: 4 complete journal lines and a torn fifth.
    eng = LLMEngine.from_model(text_model, byte_tok, max_num_seqs=4, block_size=4)
    first = run_batch(inp, outp, eng, progress=False)
    full = outp.read_text().splitlines()
    journal = tmp_path / "out.jsonl.partial"
    journal.write_text("\n".join(full[:4]) + "\n" + full[4][:20])
    outp.unlink()
    eng = LLMEngine.from_model(text_model, byte_tok, max_num_seqs=3, block_size=4)
    res = run_batch(inp, outp, eng, progress=False)
    assert first == {"total": 12, "skipped": 0, "ran": 12, "errors": 0}
    assert res == {"total": 12, "skipped": 4, "ran": 8, "errors": 0}
    assert not journal.exists()
    recs = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [r["custom_id"] for r in recs] == [x["custom_id"] for x in lines]     # input order, no dupes
    online = online_outputs(text_model, byte_tok, lines)
    for r in recs:
        choice = r["response"]["body"]["choices"][0]
        want = online[r["custom_id"]]
        assert choice["token_ids"] == want.output_token_ids
        assert choice.get("text", choice.get("message", {}).get("content")) == want.text


def test_batch_job_input_errors_name_the_line(tmp_path, text_model, byte_tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}\n'
                   '{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "y"}}\n')
    with pytest.raises(ValueError, match="line 2: duplicate custom_id 'a'"):
        read_input(bad)
    bad.write_text('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}\n')
    with pytest.raises(ValueError, match="line 1: url must be one of"):
        read_input(bad)
    bad.write_text('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "temperature": -1}}\n'
                   '{"custom_id": "b", "url": "/v1/completions",'
                   ' "body": {"prompt": "y", "max_tokens": 3, "ignore_eos": true}}\n')
    eng = LLMEngine.from_model(text_model, byte_tok, block_size=4)
    res = run_batch(bad, tmp_path / "o.jsonl", eng, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert res["errors"] == 1 and recs[0]["error"]["message"].startswith(
        "line 1 (custom_id 'a'): body.temperature: Input should be greater than or equal to 0")
    assert recs[1]["error"] is None and recs[1]["response"]["body"]["usage"]["completion_tokens"] == 3


def test_batch_job_seeds_requests_without_a_seed_as_llm_does(tmp_path, text_model, byte_tok):
    from minfer.llm import LLM
    inp = tmp_path / "in.jsonl"
    prompts = [f"w{i} w{i + 1}" for i in range(4)]
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "url": "/v1/completions",
                                       "body": {"prompt": p, "max_tokens": 6, "temperature": 1.0}}) + "\n"
                           for i, p in enumerate(prompts)))
    outs = {}
    for seed in (3, 3, 4):
        llm = LLM.from_model(text_model, byte_tok, seed=seed)
        run_batch(inp, tmp_path / "o.jsonl", llm.engine, progress=False, seeded=llm.seeded)
        outs.setdefault(seed, []).append([json.loads(x)["response"]["body"]["choices"][0]["token_ids"]
                                          for x in (tmp_path / "o.jsonl").read_text().splitlines()])
        (tmp_path / "o.jsonl").unlink()
    want = [o.outputs[0].token_ids for o in LLM.from_model(text_model, byte_tok, seed=3).generate(
        prompts, SamplingParams(temperature=1.0, max_tokens=6))]
    assert outs[3][0] == outs[3][1] == want and outs[4][0] != want


def test_batch_job_logprobs_and_echo_as_the_server_shapes_them(tmp_path, text_model, byte_tok):
    """The server's request model and choice shape: logprobs of the generated tokens, and echo with
    max_tokens 0 scores the prompt without generating (greedy: the chosen token is the top one)."""
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": "gen", "url": "/v1/completions",
              "body": {"prompt": "w1 w2 w3", "max_tokens": 4, "temperature": 0, "logprobs": 2}},
             {"custom_id": "echo", "url": "/v1/completions",
              "body": {"prompt": "w1 w2 w3", "max_tokens": 0, "echo": True, "logprobs": 1}},
             {"custom_id": "chat", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "w4"}], "max_tokens": 3, "temperature": 0,
                       "logprobs": True, "top_logprobs": 2}}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_batch(inp, outp, LLMEngine.from_model(text_model, byte_tok, block_size=4), progress=False)
    recs = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, outp.read_text().splitlines())}
    gen = recs["gen"]["choices"][0]
    lp = gen["logprobs"]
    assert len(lp["tokens"]) == len(gen["token_ids"]) == 4 and "".join(lp["tokens"]) == gen["text"]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and chosen == max(top.values())
    echo = recs["echo"]["choices"][0]
    n_prompt = len(byte_tok.encode("w1 w2 w3", add_special_tokens=True))
    assert echo["text"] == "w1 w2 w3" and echo["token_ids"] == [] and recs["echo"]["usage"]["completion_tokens"] == 0
    assert len(echo["logprobs"]["tokens"]) == n_prompt and echo["logprobs"]["token_logprobs"][0] is None
    content = recs["chat"]["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] == c["top_logprobs"][0]["logprob"] for c in content)


def test_batch_job_constrains_output_as_the_server_does(tmp_path, text_model, byte_tok):
    """``guided_choice`` and ``response_format`` in a batch body: the server's request model and the
    engine's grammar mask, so every output is one of the choices / parses as a JSON object."""
    pytest.importorskip("llguidance")
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": f"c{i}", "url": "/v1/completions",
              "body": {"prompt": f"w{i}", "max_tokens": 12, "temperature": 1.0, "seed": i,
                       "guided_choice": ["yes", "no", "maybe so"]}} for i in range(4)]
    lines.append({"custom_id": "j", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 24, "temperature": 0,
                           "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                               "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}}}}})
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_batch(inp, outp, LLMEngine.from_model(text_model, byte_tok, block_size=4), progress=False)
    recs = {r["custom_id"]: r for r in map(json.loads, outp.read_text().splitlines())}
    assert all(r["error"] is None for r in recs.values()), recs
    for i in range(4):
        assert recs[f"c{i}"]["response"]["body"]["choices"][0]["text"] in ("yes", "no", "maybe so")
    body = recs["j"]["response"]["body"]["choices"][0]
    assert body["finish_reason"] == "stop" and isinstance(json.loads(body["message"]["content"])["a"], bool)


def kill_halfway_and_resume(tmp_path, model_arg: str, model, tok, max_num_seqs: int,
                            num_blocks: int | None = None) -> None:
    """`minfer batch` on 100 requests, SIGKILLed halfway; the rerun completes, nothing lost or doubled,
    and every record equals the online engine's greedy output."""
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = write_batch_file(inp, 100, seed=1)
    cmd = [sys.executable, "-m", "minfer.cli", "batch", str(inp), str(outp), "--model", model_arg,
           "--max-num-seqs", str(max_num_seqs), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    journal = tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 50:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not outp.exists()
    done_before = journal.read_text().count("\n")
    assert 50 <= done_before < 100
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_before} already done" in rerun.stderr
    recs = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [r["custom_id"] for r in recs] == [x["custom_id"] for x in lines]
    online = online_outputs(model, tok, lines, num_blocks)
    assert all(r["response"]["body"]["choices"][0]["token_ids"] == online[r["custom_id"]].output_token_ids
               for r in recs)


@pytest.mark.slow
def test_batch_command_survives_kill(tmp_path, text_model, byte_tok):
    from minfer.checkpoints.hf import save_hf_folder
    folder = save_hf_folder(tmp_path / "tiny", text_model.cfg, text_model.state_dict(),
                            tokenizer_json=byte_tokenizer_json(), tokenizer_config=TOKENIZER_CONFIG)
    kill_halfway_and_resume(tmp_path, str(folder), text_model, byte_tok, max_num_seqs=2)


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.model
def test_smollm2_engine_matches_the_single_request_loop(smollm2_dir):
    from minfer.llm import LLM
    llm = LLM(str(smollm2_dir), kv_cache_memory_bytes=2**26)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    sp = SamplingParams(temperature=0, max_tokens=12)
    want = [list(generate_tokens(llm.model, llm.tokenizer.encode(p), sp, eos_token_ids=llm.tokenizer.eos_token_ids))
            for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, sp)] == want
    eng = LLMEngine.from_model(llm.model, llm.tokenizer, max_num_batched_tokens=16, num_blocks=64)
    got = eng.generate(prompts, sp)
    assert [r.output_token_ids for r in got] == want


def test_bench_serve_and_batch_reject_bad_arguments(tmp_path, capsys):
    from minfer.cli import main
    assert main(["bench", "serve", "--policy", "fifo"]) == 2
    assert "--policy: unknown ['fifo']" in capsys.readouterr().err
    assert main(["bench", "serve", "--baselines", "vllm"]) == 2
    assert "--baselines: unknown ['vllm']" in capsys.readouterr().err
    assert main(["bench", "serve", "--batch-invariant"]) == 2
    assert "--batch-invariant runs the engine in bfloat16" in capsys.readouterr().err
    bad = tmp_path / "in.jsonl"
    bad.write_text("not json\n")
    assert main(["batch", str(bad), str(tmp_path / "out.jsonl")]) == 2
    assert "line 1: not valid JSON" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")]) == 2
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_batch_command_survives_kill(tmp_path, smollm2_dir):
    """The same on SmolLM2 (about a minute): issue 5's 100-request kill-and-resume check."""
    from minfer.llm import LLM
    llm = LLM(str(smollm2_dir))
    kill_halfway_and_resume(tmp_path, str(smollm2_dir), llm.model, llm.tokenizer, max_num_seqs=16,
                            num_blocks=64)   # a small pool per reference engine: prompts here are < 100 tokens
