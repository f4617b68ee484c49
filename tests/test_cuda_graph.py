"""The static decode step and CUDA graphs (issue 13, item 2) and ``LLM(compile=True)`` (item 3).

* ``capture_sizes`` / ``bucket_for``: the buckets are the powers of two up to
  ``max_num_seqs`` plus ``max_num_seqs``; the bucket of n is the smallest size >= n.
* ``LLM(enforce_eager=False)`` (the static path, "replay" = calling the step on CPU)
  gives the eager LLM's and the naive oracle's greedy tokens on random tiny models
  (MHA/GQA/MQA, sliding windows, cross-layer sharing), block sizes, batch sizes that
  need padding, and preemption; seeded sampling gives the same tokens too.
* The decode steps really ran on the static path, padded; the padded rows wrote only
  the reserved scratch block: every other block of the pool equals the eager run's.
* ``max_seq_len_to_capture``: longer contexts fall back to eager, same tokens.
* ``compile=True`` equals eager (slow lane), and on a GPU the captured graphs equal eager.
* The single-request loop's static path (``generate_tokens(kv_cache="static")``, gpt-fast's
  shape) equals the contiguous loop; on a GPU its captured graph does too.
* On a GPU a decode step syncs the host once: the sampled tokens (item 5).
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import first_difference, tiny_config, tiny_configs, tiny_model

from minfer.engine.cuda_graph import StaticDecodeRunner, bucket_for, capture_sizes
from minfer.kv.block_pool import BlockPool, KVCacheManager
from minfer.llm import LLM
from minfer.naive import naive_generate
from minfer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0, ignore_eos=True)


# ---------------------------------------------------------------------------------- buckets
@settings(deadline=None)                  # a loaded 2-core machine stalls for seconds
@given(m=st.integers(1, 5000))
def test_capture_sizes_are_powers_of_two_then_max_num_seqs(m):
    sizes = capture_sizes(m)
    assert sizes[0] == 1 and sizes[-1] == m
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[:-1] == [2 ** i for i in range(len(sizes) - 1)], sizes
    assert [s for s in sizes if s & (s - 1) == 0] == [2 ** i for i in range(m.bit_length())]  # every power <= m


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None])
def test_capture_sizes_rejects_bad_max_num_seqs(bad):
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(bad)


@settings(deadline=None)                  # a loaded 2-core machine stalls for seconds
@given(m=st.integers(1, 300), data=st.data())
def test_bucket_for_is_the_smallest_size_that_fits(m, data):
    sizes = capture_sizes(m)
    n = data.draw(st.integers(1, m))
    b = bucket_for(n, sizes)
    assert b in sizes and b >= n
    assert not [s for s in sizes if n <= s < b]
    assert b < 2 * n or b == 1, "a bucket wastes less than half of its rows"
    with pytest.raises(ValueError, match=rf"n={m + 1}\b.*1 to {m}\b"):
        bucket_for(m + 1, sizes)
    with pytest.raises(ValueError, match="n=0"):
        bucket_for(0, sizes)


# ---------------------------------------------------------------------------------- the scratch block
@settings(deadline=None)                  # a loaded 2-core machine stalls for seconds
@given(num_blocks=st.integers(2, 12), block_size=st.integers(1, 4), lens=st.lists(st.integers(1, 9), max_size=6))
def test_the_reserved_scratch_block_is_never_handed_out(num_blocks, block_size, lens):
    pool = BlockPool(num_blocks, block_size)
    scratch = pool.reserve_block()
    assert pool.num_blocks == num_blocks - 1 == pool.num_free_blocks
    mgr = KVCacheManager(pool)
    for i, n in enumerate(lens):
        mgr.allocate(i, list(range(n)))
        held = {b for s in mgr.seqs.values() for b in s.block_table}
        assert scratch not in held
        assert pool.num_free_blocks + len(held) == pool.num_blocks      # the accounting still holds
    for i in list(mgr.seqs):
        mgr.free(i)
    assert pool.num_free_blocks == pool.num_blocks


# ---------------------------------------------------------------------------------- static == eager == oracle
def _count_static_runs(llm):
    """Wrap the runner's static path to record the (batch, bucket) of every decode step it runs."""
    static = llm.engine.runner.static
    seen, run = [], static.run

    def counted(input_ids, meta, rows):
        S = len(meta.query_lens)
        seen.append((S, bucket_for(S, static.sizes)))
        return run(input_ids, meta, rows)
    static.run = counted
    return seen


@settings(max_examples=15, deadline=None)
@given(cfg=tiny_configs(), seed=st.integers(0, 1000), num=st.integers(1, 6), max_new=st.integers(2, 7),
       block_size=st.sampled_from([1, 2, 4, 16]), max_num_seqs=st.integers(1, 7), tight=st.booleans())
def test_static_decode_equals_eager_and_the_oracle(cfg, seed, num, max_new, block_size, max_num_seqs, tight):
    """tight: a pool with room for little more than the largest request, so requests are preempted."""
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(num)]
    params = SamplingParams(max_tokens=max_new, **GREEDY)
    biggest = max(-(-(len(p) + max_new) // block_size) for p in prompts)
    args = dict(block_size=block_size, num_blocks=biggest + (1 if tight else 64), max_num_seqs=max_num_seqs,
                max_num_batched_tokens=64)
    eager = LLM.from_model(model, **args)
    static = LLM.from_model(model, enforce_eager=False, **args)
    assert eager.enforce_eager and not static.enforce_eager
    steps = _count_static_runs(static)
    want, got = eager.generate(prompts, params), static.generate(prompts, params)
    assert steps, "no decode step ran on the static path"
    for p, w, g in zip(prompts, want, got):
        assert g.token_ids == w.token_ids, first_difference(g.token_ids, w.token_ids)
        oracle = naive_generate(model.state_dict(), cfg, p, params)
        assert g.token_ids == oracle, first_difference(g.token_ids, oracle)
        assert g.metrics.num_preemptions == w.metrics.num_preemptions   # the same schedule
    pool = static.engine.runner.kv_manager.pool
    assert pool.num_free_blocks == pool.num_blocks                        # everything was given back


def test_preemption_happens_on_the_static_path():
    """The 'tight' case above really preempts, and a recomputed request decodes on the static path again."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    prompts, params = [[1, 2, 3, 4], [5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, **GREEDY)
    args = dict(block_size=2, num_blocks=6, max_num_batched_tokens=64, max_num_seqs=3)
    want = LLM.from_model(model, **args).generate(prompts, params)
    llm = LLM.from_model(model, enforce_eager=False, **args)
    steps = _count_static_runs(llm)
    got = llm.generate(prompts, params)
    assert sum(o.metrics.num_preemptions for o in got) > 0 and len(steps) > 3
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_padded_rows_write_only_the_scratch_block():
    """Batches of 3 and 5 run in buckets 4 and 8; every block but the scratch equals the eager pool's."""
    cfg = tiny_config(num_key_value_heads=1)
    model = tiny_model(cfg, seed=3)
    rng = random.Random(3)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(2, 9))] for _ in range(5)]
    params = [SamplingParams(max_tokens=4 + i, **GREEDY) for i in range(5)]   # the batch shrinks: 5, 4, 3 ...
    args = dict(block_size=4, num_blocks=40, max_num_seqs=8, enable_prefix_caching=False)
    eager, static = LLM.from_model(model, **args), LLM.from_model(model, enforce_eager=False, **args)
    steps = _count_static_runs(static)
    assert [o.token_ids for o in static.generate(prompts, params)] == \
        [o.token_ids for o in eager.generate(prompts, params)]
    assert (5, 8) in steps and (3, 4) in steps, steps                       # padded buckets ran
    runner = static.engine.runner
    scratch = runner.static.scratch_block
    assert scratch == 40 and runner.cache.num_blocks == 41                 # one more block than asked for
    mine = runner.cache.kv[:, :, :40]                                       # every block sequences can hold
    torch.testing.assert_close(mine, eager.engine.runner.cache.kv, atol=1e-5, rtol=1e-5)
    assert runner.cache.kv[:, :, scratch].abs().sum() > 0                  # the padding went somewhere: here


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), temperature=st.floats(0.5, 1.5), top_k=st.sampled_from([0, 5]),
       max_num_seqs=st.integers(2, 5))
def test_seeded_sampling_is_the_same_on_the_static_path(seed, temperature, top_k, max_num_seqs):
    cfg = tiny_config()
    model = tiny_model(cfg, seed=seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 8))] for _ in range(4)]
    params = [SamplingParams(temperature=temperature, top_k=top_k, max_tokens=6, seed=seed + i, ignore_eos=True)
              for i in range(4)]
    args = dict(block_size=2, max_num_seqs=max_num_seqs)
    want = [o.token_ids for o in LLM.from_model(model, **args).generate(prompts, params)]
    got = [o.token_ids for o in LLM.from_model(model, enforce_eager=False, **args).generate(prompts, params)]
    assert got == want


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_quantized_kv_pages_on_the_static_path(kv_cache_dtype):
    """int8/fp8 pages are read and written through the same static plan: the eager engine's tokens."""
    cfg = tiny_config(num_key_value_heads=1)
    model = tiny_model(cfg, seed=6)
    rng = random.Random(6)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(3)]
    params = SamplingParams(max_tokens=6, **GREEDY)
    args = dict(block_size=4, max_num_seqs=4, kv_cache_dtype=kv_cache_dtype)
    try:
        want = [o.token_ids for o in LLM.from_model(model, **args).generate(prompts, params)]
    except ValueError as e:                                                 # fp8 needs a recent torch
        pytest.skip(str(e))
    llm = LLM.from_model(model, enforce_eager=False, **args)
    steps = _count_static_runs(llm)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want and steps


def test_longer_contexts_than_the_captured_width_run_eager():
    """max_seq_len_to_capture=8 (two blocks of 4): decodes past position 8 fall back to eager."""
    cfg = tiny_config()
    model = tiny_model(cfg, seed=1)
    prompts, params = [[5, 6, 7], [8, 9, 10, 11, 12]], SamplingParams(max_tokens=10, **GREEDY)
    want = [o.token_ids for o in LLM.from_model(model, block_size=4).generate(prompts, params)]
    llm = LLM.from_model(model, block_size=4, enforce_eager=False, max_seq_len_to_capture=8)
    assert llm.engine.runner.static.max_blocks == 2
    steps = _count_static_runs(llm)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert 0 < len(steps) < 9, f"{len(steps)} static steps: the short contexts only"


def test_engine_arguments_are_checked():
    model = tiny_model(tiny_config())
    assert LLM.from_model(model).enforce_eager is True                      # CPU default: eager (docstring)
    assert LLM.from_model(model, enforce_eager=False).engine.runner.static.max_blocks == 128 // 16
    big = tiny_model(tiny_config(max_position_embeddings=20000))            # the width is capped at 8192 keys
    assert LLM.from_model(big, enforce_eager=False, num_blocks=8).engine.runner.static.max_blocks == 8192 // 16
    with pytest.raises(ValueError, match="compile=True.*enforce_eager"):
        LLM.from_model(model, enforce_eager=True, compile=True)
    with pytest.raises(ValueError, match="max_seq_len_to_capture"):
        LLM.from_model(model, enforce_eager=False, max_seq_len_to_capture=0)


# ---------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_equals_eager_on_a_tiny_model():
    """torch.compile of the static step: the same greedy tokens; its compile time is reported apart.
    (Slow lane: 15-60 s on 2 CPU cores, depending on the inductor cache.)"""
    cfg = tiny_config(num_hidden_layers=1)
    model = tiny_model(cfg, seed=2)
    rng = random.Random(2)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(3)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    want = [o.token_ids for o in LLM.from_model(model, block_size=4, max_num_seqs=4).generate(prompts, params)]
    llm = LLM.from_model(model, block_size=4, max_num_seqs=4, compile=True)
    assert not llm.enforce_eager and llm.compile_seconds > 0
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


# ---------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_on_gpu(dtype):
    """Graphs captured for buckets 1, 2, 4, 8: replaying them gives the tokens of the same static step
    called without a graph (any dtype: the same kernels) and, in fp32, the eager engine's tokens."""
    from minfer.model import build_model
    cfg = tiny_config(num_hidden_layers=3, num_key_value_heads=1)
    model = build_model(cfg, seed=4, device="cuda", dtype=dtype)
    rng = random.Random(4)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(7)]
    params = [SamplingParams(max_tokens=5 + 2 * i, **GREEDY) for i in range(7)]
    args = dict(block_size=16, max_num_seqs=8)
    graphs = LLM.from_model(model, **args)                                   # CUDA default: graphs
    static = graphs.engine.runner.static
    assert not graphs.enforce_eager and isinstance(static, StaticDecodeRunner) and static.use_cuda_graph
    assert sorted(static.graphs) == [1, 2, 4, 8] and graphs.capture_seconds > 0
    plain = LLM.from_model(model, enforce_eager=False, **args)
    plain.engine.runner.static.use_cuda_graph = False                       # the step called, not replayed
    steps = _count_static_runs(graphs)
    got = [o.token_ids for o in graphs.generate(prompts, params)]
    assert {b for _, b in steps} == {8, 4, 2, 1}, steps                     # every bucket replayed
    assert got == [o.token_ids for o in plain.generate(prompts, params)]
    if dtype == torch.float32:
        want = [o.token_ids for o in LLM.from_model(model, enforce_eager=True, **args).generate(prompts, params)]
        for g, w in zip(got, want):
            assert g == w, first_difference(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_a_decode_step_syncs_the_host_once_on_gpu(enforce_eager):
    """Item 5: a decode step (schedule, flatten, forward, sample, stop checks) waits for the GPU
    once, when the sampled token ids come back. torch's sync debug mode warns at every
    synchronizing call; greedy and seeded rows are mixed, and the batch crosses a block boundary."""
    import warnings

    from minfer.model import build_model
    cfg = tiny_config(num_hidden_layers=2, num_key_value_heads=1)
    llm = LLM.from_model(build_model(cfg, seed=5, device="cuda"), block_size=4, max_num_seqs=4,
                         enforce_eager=enforce_eager)
    eng = llm.engine
    for i, n in enumerate([3, 6, 9]):
        params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0 if i % 2 else 0.8, seed=i)
        eng.add_request(list(range(1, n + 1)), params)
    while any(r.num_output_tokens == 0 for r in eng.requests.values()):   # prefills: not measured
        eng.step()
    for _ in range(4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                eng.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, syncs


# ---------------------------------------------------------------------------------- the single-request loop
@settings(max_examples=12, deadline=None)
@given(cfg=tiny_configs(), prompt_len=st.integers(1, 12), n=st.integers(1, 10), seed=st.integers(0, 99),
       temperature=st.sampled_from([0.0, 0.9]))
def test_static_single_request_loop_equals_the_contiguous_one(cfg, prompt_len, n, seed, temperature):
    """generate_tokens(kv_cache="static"): fixed-shape decode steps (StaticSingleDecode, "replay" on
    CPU) give the contiguous loop's tokens, greedy and seeded; the decodes really ran static."""
    from minfer.engine import cuda_graph
    from minfer.generate import generate_tokens
    model = tiny_model(cfg, seed=seed)
    prompt = random.Random(seed).choices(range(cfg.vocab_size), k=prompt_len)
    params = SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, seed=seed)
    calls = []
    step = cuda_graph.StaticSingleDecode.step

    def counted(self, tok, pos):
        calls.append(pos)
        return step(self, tok, pos)
    cuda_graph.StaticSingleDecode.step = counted
    try:
        static = list(generate_tokens(model, prompt, params, kv_cache="static"))
    finally:
        cuda_graph.StaticSingleDecode.step = step
    want = list(generate_tokens(model, prompt, params, kv_cache="contiguous"))
    assert static == want, first_difference(static, want)
    assert calls == list(range(prompt_len, prompt_len + n - 1))       # every decode, at its position


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_single_request_graph_equals_eager_on_gpu():
    """The single-request loop's captured decode step replays to the contiguous loop's tokens."""
    from minfer.generate import generate_tokens
    from minfer.model import build_model
    cfg = tiny_config(num_hidden_layers=3, num_key_value_heads=1)
    model = build_model(cfg, seed=6, device="cuda")
    for prompt, params in (([5, 9, 2, 7], SamplingParams(max_tokens=20, **GREEDY)),
                           ([3] * 17, SamplingParams(max_tokens=9, temperature=0.8, seed=1, ignore_eos=True))):
        got = list(generate_tokens(model, prompt, params, kv_cache="static"))
        assert got == list(generate_tokens(model, prompt, params, kv_cache="contiguous"))


# ---------------------------------------------------------------------------------- the command line
def test_cli_flags_reach_the_engine(monkeypatch):
    import minfer.cli as cli
    import minfer.llm
    seen = {}
    monkeypatch.setattr(minfer.llm, "LLM", lambda *a, **kw: seen.update(kw))
    cli._llm(cli.build_parser().parse_args(["generate", "hi", "--compile"]), max_num_seqs=1)
    assert seen["compile"] is True and seen["enforce_eager"] is None and seen["max_num_seqs"] == 1
    seen.clear()
    cli._llm(cli.build_parser().parse_args(["generate", "hi", "--enforce-eager"]))
    assert seen["compile"] is False and seen["enforce_eager"] is True


def test_cli_compile_with_enforce_eager_is_a_clear_error(tmp_path, capsys):
    from servers import tiny_model_folder

    from minfer.cli import main
    folder = tiny_model_folder(tmp_path / "tiny")
    assert main(["generate", "hi", "--model", str(folder), "--compile", "--enforce-eager"]) == 2
    assert "enforce_eager" in capsys.readouterr().err


def test_single_request_loops_build_no_static_path(tmp_path):
    """Speculative decoding runs eager: no capture, and compile=True is refused clearly."""
    from servers import tiny_model_folder
    folder = str(tiny_model_folder(tmp_path / "tiny"))
    assert LLM(folder, speculative="prompt_lookup", enforce_eager=False).engine.runner.static is None
    with pytest.raises(ValueError, match="compile=True.*speculative decoding runs eager"):
        LLM(folder, speculative="prompt_lookup", compile=True)
