"""minfer.distributed: tensor parallel, pipeline parallel and disaggregated serving on 2 gloo processes.

The multi-process checks live in ``minfer.distributed.checks`` (spawned processes must import
them); each spawns one 2-rank group and compares, on the same rank, the parallel run with the
single-process one. Rank 0 saves its findings; the tests below assert on them. Three process
groups in all (the checks, a dying rank, LLM(tensor_parallel_size=3)), plus torchrun on SmolLM2 (slow).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minfer.distributed import comm
from minfer.distributed.checks import TP_CASES, all_checks_worker, dying_rank_worker, tiny_config
from minfer.distributed.layers import QKVParallelLinear, shard_range
from minfer.distributed.pipeline import bubble_fraction, stage_layers
from minfer.distributed.tensor_parallel import build_tp_model, check_tp_size, local_config

pytestmark = pytest.mark.usefixtures("one_thread")
FP32_ATOL = 1e-4


def _launch(worker, tmp_path_factory, *args):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    comm.launch(worker, 2, str(out), *args)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return _launch(all_checks_worker, tmp_path_factory)


# ---------------------------------------------------------------- tensor parallel


@pytest.mark.parametrize("case", list(TP_CASES) + [f"random {i}" for i in range(6)])
def test_tp2_equals_tp1(checks, case):
    """Named shapes, and 6 random configs (heads, head_dim, widths, bias, tied, layers) drawn with a seed."""
    r = checks["tp"][case]
    assert r["max_abs_err"] < FP32_ATOL, f"{case}: logits differ by {r['max_abs_err']:.3e}"
    assert r["tokens_tp"] == r["tokens_full"], f"{case}: contiguous cache {r['tokens_tp']} vs {r['tokens_full']}"
    assert r["tokens_tp_paged"] == r["tokens_full"], f"{case}: paged cache"
    if not case.startswith("random"):
        assert len(set(r["tokens_full"])) > 1, "the tiny model should not just repeat one token"


def test_tp_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="does not divide num_attention_heads=3"):   # before any collective
        build_tp_model(tiny_config(num_attention_heads=3, num_key_value_heads=3, hidden_size=30), None, 0, 2)


def test_check_tp_size_smollm2_shape():
    cfg = tiny_config(num_attention_heads=9, num_key_value_heads=3, hidden_size=36, intermediate_size=48)
    check_tp_size(cfg, 3)                                      # 3 query heads and 1 K/V head per rank
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide num_attention_heads=9.*\[1, 3\]"):
        check_tp_size(cfg, 2)                                  # (9 does not divide intermediate_size=48)
    with pytest.raises(ValueError, match="neither divides"):
        check_tp_size(tiny_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=36), 3)
    with pytest.raises(ValueError, match="intermediate_size"):
        check_tp_size(tiny_config(intermediate_size=50), 4)
    local = local_config(cfg, 3)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (3, 1, 4)


def test_kv_heads_replicated_when_tp_exceeds_them():
    # MQA over 4 ranks: every rank holds the one K/V head; GQA 2 K/V heads over 4: ranks 0,1 -> 0; 2,3 -> 1
    assert [QKVParallelLinear.head_range(8, 1, r, 4, "kv") for r in range(4)] == [(0, 1)] * 4
    assert [QKVParallelLinear.head_range(8, 2, r, 4, "kv") for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    # ... and the query heads of rank r all read that K/V head (GQA groups stay with their K/V head)
    for r in range(4):
        q0, q1 = QKVParallelLinear.head_range(8, 2, r, 4, "q")
        assert {h // 4 for h in range(q0, q1)} == {QKVParallelLinear.head_range(8, 2, r, 4, "kv")[0]}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_column_and_row_shards_rebuild_the_linear(world, out_per, in_per, seed):
    """Megatron's algebra, without processes: concat of column shards and sum of row shards = x @ W.T."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_per * world, in_per * world, generator=g, dtype=torch.float64)
    x = torch.randn(3, in_per * world, generator=g, dtype=torch.float64)
    cols, rows = [], []
    for r in range(world):
        o0, o1 = shard_range(W.shape[0], r, world)
        i0, i1 = shard_range(W.shape[1], r, world)
        cols.append(x @ W[o0:o1].T)                             # column parallel: a slice of y
        rows.append(x[:, i0:i1] @ W[:, i0:i1].T)                # row parallel: a partial sum of y
    torch.testing.assert_close(torch.cat(cols, -1), x @ W.T)
    torch.testing.assert_close(sum(rows), x @ W.T)


def test_parallel_engine_equals_single_engine(checks):
    """LLMEngine with a DriverRunner on rank 0 and follow_engine on rank 1 (TP shards; pipeline stages
    with 1 and 2 micro-batches per step) vs the engine on the whole model; half the requests ask for
    logprobs and prompt logprobs (a step with prompt rows runs as one micro-batch)."""
    assert {name for _, name in checks["engine"]} == {"tp", "pp", "pp, 2 micro-batches"}
    for (seed, name), r in checks["engine"].items():
        assert r["got"] == r["want"], f"seed {seed}, {name}: engine {r['got']} vs one process {r['want']}"
        assert r["logprob_err"] < FP32_ATOL, f"seed {seed}, {name}: prompt/sampled logprobs differ"
        assert r["steps"] > len(r["want"]), "requests should share steps (continuous batching)"
        assert r["microbatches"] == (2 if "micro" in name else 1), f"{name}: micro-batches in a step"


# ---------------------------------------------------------------- pipeline parallel


@pytest.mark.parametrize("case", ["GQA", "untied"])
def test_pp2_equals_pp1(checks, case):
    r = checks["pp"][case]
    for m, err in r["max_abs_err"].items():
        assert err < FP32_ATOL, f"{case}, {m} micro-batches: logits differ by {err:.3e}"
    assert r["tokens_pp"] == r["tokens_full"]


def test_stage_layers_and_bubble():
    assert [list(stage_layers(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [list(stage_layers(6, r, 2, share_group=2)) for r in range(2)] == [[0, 1, 2, 3], [4, 5]] or \
        [list(stage_layers(6, r, 2, share_group=2)) for r in range(2)] == [[0, 1], [2, 3, 4, 5]]
    assert all(len(stage_layers(6, r, 2, 2)) % 2 == 0 for r in range(2))   # no sharing group is cut
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 is more than num_hidden_layers=3"):
        stage_layers(3, 0, 4)
    assert bubble_fraction(2, 1) == 0.5 and bubble_fraction(4, 13) == 0.1875


# ---------------------------------------------------------------- disaggregation


def test_disaggregated_equals_single_engine(checks):
    for (seed, kind), r in checks["disagg"].items():
        assert r["got"] == r["want"], f"seed {seed}, {kind}: disaggregated {r['got']} vs one engine {r['want']}"
        assert r["prefix_hit_tokens"] > 0, "the trace should hit the prefill worker's prefix cache"


# ---------------------------------------------------------------- failures


def test_dying_rank_gives_a_clear_error(tmp_path_factory):
    """The follower's process exits mid-request: the driver raises DistributedError (no hang), and
    the engine's in-flight requests are finished as aborted."""
    r = _launch(dying_rank_worker, tmp_path_factory)
    assert r["error"] is not None and "failed (another rank died" in r["error"], r
    assert len(r["tokens"]) >= 1 and r["seconds"] < 30
    assert r["finish_reasons"] == ["abort", "abort"]


# ---------------------------------------------------------------- the public API


def test_llm_tensor_parallel_equals_single_process_and_batches(tmp_path):
    """LLM(tensor_parallel_size=3) on 8 prompts: the same tokens as one process, and one batched
    engine step per token (the driver's shard runs about max_tokens forwards, not 8 x max_tokens)."""
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    from minfer.distributed.checks import random_model
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams
    cfg = tiny_config(vocab_size=260, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    folder = save_hf_folder(tmp_path / "m", cfg, random_model(cfg).state_dict(), *tiny_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["hello", "a longer prompt here", "x", "the", "tensor", "parallel", "batched", "engine step"]
    single = LLM(str(folder))
    want = [o.token_ids for o in single.generate(prompts, params)]
    text = single.generate(prompts[1], params)[0].text
    stop = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, stop=[text[2:4]])
    want_stop = single.generate(prompts[1], stop)[0].token_ids
    llm = LLM(str(folder), tensor_parallel_size=3)
    forwards = []
    llm.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        got_stop = llm.generate(prompts[1], stop)[0].token_ids    # only the driver sees the stop string
        forwards.clear()
        got = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.driver.shutdown()
    assert len(want_stop) < 6, "the stop string should end the request early"
    assert got_stop == want_stop
    assert got == want, "after an early stop the followers must still be in step with the driver"
    assert len(forwards) <= params.max_tokens + 1, f"{len(forwards)} forwards for 8 prompts: not batched"


# ---------------------------------------------------------------- torchrun on SmolLM2 (slow)


def _generate(smollm2_dir, launcher: list[str], *extra: str) -> str:
    import subprocess
    import sys
    cmd = [sys.executable, *launcher, "-m", "minfer.cli", "generate", "The capital of France is",
           "--model", str(smollm2_dir), "--temperature", "0", "--max-tokens", "12", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.model
def test_torchrun_generate_equals_single_process(smollm2_dir):
    want = _generate(smollm2_dir, [])
    run = ["-m", "torch.distributed.run", "--nproc-per-node"]
    assert _generate(smollm2_dir, [*run, "3"]) == want                           # TP=3: 3 query heads, 1 K/V head each
    assert _generate(smollm2_dir, [*run, "2"], "--pipeline-parallel") == want    # 2 pipeline stages


@pytest.mark.slow
@pytest.mark.model
def test_torchrun_tp2_refused_for_smollm2(smollm2_dir):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "minfer.cli", "generate", "hi", "--model", str(smollm2_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "tensor_parallel_size=2 does not divide num_attention_heads=9" in done.stderr
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr   # (torchrun's own
    # report of a failed child is its business)


# ---------------------------------------------------------------- the engine hooks, in one process


def test_add_prefilled_request_continues_like_one_engine():
    """Prefill on engine A (1 token), move the K/V with admit_prefilled into engine B, decode there:
    the same tokens as A alone, for a greedy and a seeded request; a full pool admits nothing."""
    from minfer.distributed.checks import _engine, mixed_trace, random_model
    from minfer.distributed.disagg import PrefilledRequest, admit_prefilled
    from minfer.sampling import SamplingParams
    cfg = tiny_config()
    trace = mixed_trace(4, 3, cfg.vocab_size)
    for params in (SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                   SamplingParams(temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)):
        want = _engine(random_model(cfg)).generate([r.prompt_token_ids for r in trace], params)
        a, b = _engine(random_model(cfg)), _engine(random_model(cfg))
        for r in trace:
            rid = a.add_request(r.prompt_token_ids, params)
            while not a.requests[rid].output_token_ids:
                a.step()
            req, table = a.requests[rid], a.runner.kv_manager.block_table(rid)
            meta = PrefilledRequest(rid, req.prompt_token_ids, params, req.arrival_time, req.output_token_ids[0],
                                    req.stats.token_times[0], req.generator.get_state())
            assert admit_prefilled(b, meta, a.runner.cache.k[:, table], a.runner.cache.v[:, table])
            a.abort(rid)
        b.run()
        assert [b.requests[f"req-{i}"].output_token_ids for i in range(len(trace))] == \
            [q.output_token_ids for q in want]
    full = _engine(random_model(cfg), num_blocks=8)                  # 5 of 8 blocks taken by a running request
    full.add_request(list(range(40, 60)), params)
    full.step()
    meta = PrefilledRequest("x", list(range(20)), params, 0.0, 1, 0.0, None)
    k = torch.zeros(full.runner.cache.k.shape[0], 5, *full.runner.cache.k.shape[2:])
    assert not admit_prefilled(full, meta, k, k)
    assert "x" not in full.requests and len(full.scheduler.running) == 1
