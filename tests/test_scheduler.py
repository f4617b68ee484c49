"""The scheduler against a fake model: budgets, the block pool, preemption, liveness.

The fake model (``minfer.serving.fake.FakeRunner``) reads every scheduled
sequence's context back through its block table before producing logits, so a
bookkeeping bug shows up as a corrupted cache, and its outputs are a function
of the context only, so every finished request must equal ``fake_generate``
run alone.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minfer.sampling import SamplingParams
from minfer.engine import LLMEngine
from minfer.serving.fake import FakeClock, FakeRunner, fake_generate
from minfer.engine.request import RequestStatus
from minfer.engine.scheduler import POLICIES, SchedulerConfig

VOCAB = 16


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: see conftest.py
EOS = 3


def make_engine(policy="continuous", num_blocks=32, block_size=4, budget=16, max_num_seqs=4,
                chunk=None, prefix=True, max_wait_ms=50.0, clock=None, batch_invariant=False):
    clock = clock or FakeClock()
    runner = FakeRunner(num_blocks, block_size, VOCAB, enable_prefix_caching=prefix, clock=clock)
    cfg = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          max_prefill_chunk=chunk, max_wait_ms=max_wait_ms, batch_invariant=batch_invariant)
    return LLMEngine(runner, cfg, eos_token_ids=[EOS], max_model_len=1000, clock=clock)


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort sequences; invariants after every rule; drain at the end."""

    @initialize(policy=st.sampled_from(POLICIES), block_size=st.sampled_from([1, 2, 4]),
                num_blocks=st.integers(8, 40), budget=st.integers(1, 24), max_num_seqs=st.integers(1, 5),
                chunk=st.none() | st.integers(1, 8), prefix=st.booleans())
    def setup(self, policy, block_size, num_blocks, budget, max_num_seqs, chunk, prefix):
        self.engine = make_engine(policy, num_blocks, block_size, budget, max_num_seqs, chunk, prefix)
        self.budget, self.max_num_seqs = budget, max_num_seqs
        self.expected: dict[str, list[int]] = {}
        self.aborted: set[str] = set()
        self.capacity = num_blocks * block_size

    @rule(data=st.data(), plen=st.integers(1, 12), max_tokens=st.integers(1, 10), shared=st.booleans())
    def add(self, data, plen, max_tokens, shared):
        # Some prompts share a prefix with the first one, to exercise prefix caching.
        if shared and self.expected:
            first = self.engine.requests[next(iter(self.expected))].prompt_token_ids
            prompt = (first + [1] * plen)[:max(plen, len(first) // 2 + 1)]
        else:
            prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=plen, max_size=plen))
        if len(prompt) + max_tokens > self.capacity:       # the engine must refuse it cleanly
            with pytest.raises(ValueError, match="num_blocks"):
                self.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
            return
        rid = self.engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        self.expected[rid] = fake_generate(prompt, max_tokens, VOCAB, stop_token_ids=[EOS])

    @rule()
    def step(self):
        self._checked_step()

    @rule()
    def no_more_requests(self):
        self.engine.no_more_requests(True)

    @precondition(lambda self: any(not r.is_finished for r in self.engine.requests.values()))
    @rule(data=st.data())
    def abort(self, data):
        live = [rid for rid, r in self.engine.requests.items() if not r.is_finished]
        rid = data.draw(st.sampled_from(live))
        self.engine.abort(rid)
        self.aborted.add(rid)

    def _checked_step(self):
        eng = self.engine
        forwards = eng.runner.num_forwards
        eng.step()
        if eng.runner.num_forwards > forwards:
            assert eng.runner.batched_tokens[-1] <= self.budget, "token budget exceeded"
        sched = eng.scheduler
        if sched.config.policy == "continuous" or sched.no_more_requests:
            if sched.has_unfinished():           # liveness: something must run
                assert eng.runner.num_forwards > forwards or not sched.waiting and not sched.running

    @invariant()
    def bookkeeping_consistent(self):
        if not hasattr(self, "engine"):
            return
        sched, mgr = self.engine.scheduler, self.engine.runner.kv_manager
        assert len(sched.running) <= self.max_num_seqs
        assert not set(map(id, sched.waiting)) & set(map(id, sched.running))
        for r in sched.running:
            assert r.status is RequestStatus.RUNNING and r.request_id in mgr.seqs
            assert r.num_computed_tokens <= r.num_tokens
        for r in sched.waiting:
            assert r.status is RequestStatus.WAITING and r.request_id not in mgr.seqs
        assert set(mgr.seqs) == {r.request_id for r in sched.running}
        # Every block's ref count is the number of block tables holding it; the pool is never overdrawn.
        holders: dict[int, int] = {}
        for st_ in mgr.seqs.values():
            for b in st_.block_table:
                holders[b] = holders.get(b, 0) + 1
        for b, blk in enumerate(mgr.pool.blocks):
            assert blk.ref_cnt == holders.get(b, 0)
        assert len(holders) + mgr.pool.num_free_blocks == mgr.pool.num_blocks
        for r in self.engine.requests.values():
            if not r.is_finished:
                assert (r in sched.running) != (r in sched.waiting), "a live request is lost"

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        eng = self.engine
        eng.no_more_requests(True)
        for _ in range(5000):
            if not eng.has_unfinished_requests():
                break
            self._checked_step()
        assert not eng.has_unfinished_requests(), "admitted requests never finished"
        for rid, want in self.expected.items():
            r = eng.requests[rid]
            if rid in self.aborted and r.status is RequestStatus.FINISHED_ABORTED:
                assert r.output_token_ids == want[:r.num_output_tokens]
                continue
            assert r.output_token_ids == want, f"{rid}: {r.output_token_ids} != {want}"
            assert r.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        assert eng.runner.kv_manager.seqs == {}


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- targeted cases


def _add(eng, n, plen=6, max_tokens=5, start=0):
    for i in range(n):
        eng.add_request([(start + i + j) % VOCAB for j in range(plen)],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def test_continuous_fills_budget_decodes_first_then_chunks_a_prefill():
    eng = make_engine("continuous", num_blocks=64, budget=8, max_num_seqs=8)
    _add(eng, 2, plen=3)
    eng.step()                                      # both prompts (3 + 3 tokens)
    _add(eng, 1, plen=20, start=5)
    out = eng.scheduler.schedule()
    kinds = [(c.request.request_id, c.num_tokens) for c in out.chunks]
    assert kinds == [("req-0", 1), ("req-1", 1), ("req-2", 6)]   # decodes, then 6 of 20 prompt tokens
    assert out.num_batched_tokens == 8


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(1, 16), chunk=st.none() | st.integers(1, 8), max_num_seqs=st.integers(1, 4),
       plens=st.lists(st.integers(1, 30), min_size=1, max_size=6))
def test_batch_invariant_cuts_prompts_at_fixed_positions_only(budget, chunk, max_num_seqs, plens):
    """``batch_invariant``: every prompt chunk starts at a multiple of the cap and ends at the next one
    or at the prompt's end, whatever else runs; every request still finishes."""
    eng = make_engine(num_blocks=400, budget=budget, max_num_seqs=max_num_seqs, chunk=chunk, prefix=False,
                      batch_invariant=True)
    for i, n in enumerate(plens):
        _add(eng, 1, plen=n, max_tokens=3, start=7 * i)
    cap, chunks, schedule = min(chunk or budget, budget), [], eng.scheduler.schedule
    eng.scheduler.schedule = lambda: (out := schedule(), chunks.extend(
        (c.start, c.num_tokens, c.request.num_prompt_tokens) for c in out.chunks))[0]
    for _ in range(500):
        if not eng.has_unfinished_requests():
            break
        eng.step()
    assert not eng.has_unfinished_requests()
    for start, n, plen in chunks:
        if start < plen:                                # a prompt chunk
            assert start % cap == 0 and start + n in (plen, start + cap), (start, n, plen, cap)


def test_static_batch_admits_nobody_until_all_members_finish():
    eng = make_engine("static", num_blocks=64, budget=64, max_num_seqs=2)
    _add(eng, 2, max_tokens=2)
    eng.step()
    _add(eng, 2, max_tokens=2, start=7)
    while any(not eng.requests[r].is_finished for r in ("req-0", "req-1")):
        assert {r.request_id for r in eng.scheduler.running} <= {"req-0", "req-1"}
        eng.step()
    eng.step()
    assert {r.request_id for r in eng.scheduler.running} == {"req-2", "req-3"}


def test_static_waits_for_a_full_batch_dynamic_for_max_wait():
    for policy, ran in [("static", False), ("dynamic", True)]:
        clock = FakeClock()
        eng = make_engine(policy, num_blocks=64, max_num_seqs=4, max_wait_ms=100, clock=clock)
        _add(eng, 2)
        assert eng.step() == [] and eng.runner.num_forwards == 0
        clock.advance(0.2)
        eng.step()
        assert (eng.runner.num_forwards == 1) is ran, policy


def test_preemption_takes_the_newest_running_request():
    # 6 blocks of 4 slots; three requests of 8 prompt tokens would each need a third block to decode.
    eng = make_engine("continuous", num_blocks=6, block_size=4, budget=64, max_num_seqs=4)
    _add(eng, 3, plen=8, max_tokens=6)
    eng.step()                                   # admits req-0, req-1, req-2 (2 blocks each, pool full)
    eng.step()                                   # req-0 needs a block: req-2 (newest) is preempted
    assert [r.request_id for r in eng.scheduler.running] == ["req-0", "req-1"]
    assert eng.requests["req-2"].num_preemptions == 1
    assert eng.scheduler.waiting[0].request_id == "req-2"
    eng.no_more_requests()
    eng.run()
    for i in range(3):
        r = eng.requests[f"req-{i}"]
        assert r.output_token_ids == fake_generate(r.prompt_token_ids, 6, VOCAB)


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(POLICIES), budget=st.integers(1, 20), chunk=st.none() | st.integers(1, 6),
       num_blocks=st.integers(10, 30), seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=6))
def test_sampled_outputs_depend_on_the_seed_only(policy, budget, chunk, num_blocks, seeds):
    """Temperature sampling with per-request seeds: same tokens alone and in any batch."""
    prompts = [[(s + j) % VOCAB for j in range(1 + s % 7)] for s in seeds]
    params = [SamplingParams(temperature=1.0, top_k=5, max_tokens=6, seed=s, ignore_eos=True) for s in seeds]
    alone = []
    for p, sp in zip(prompts, params):
        e = make_engine(policy, num_blocks=num_blocks, budget=budget, chunk=chunk)
        alone.append(e.generate([p], sp)[0].output_token_ids)
    e = make_engine(policy, num_blocks=num_blocks, budget=budget, chunk=chunk)
    together = [r.output_token_ids for r in e.generate(prompts, params)]
    assert together == alone


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(1, 20), max_num_seqs=st.integers(1, 5),
       plan=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2)), min_size=1, max_size=8))
def test_scheduler_step_is_continuous_step_when_memory_is_plentiful(budget, max_num_seqs, plan):
    """The lesson's exercise ``continuous_step`` is exactly what the engine's scheduler does."""
    from minfer.lessons.ex_serving import continuous_step
    eng = make_engine("continuous", num_blocks=400, block_size=4, budget=budget, max_num_seqs=max_num_seqs,
                      prefix=False)
    for i, (plen, max_tokens, steps_before) in enumerate(plan):
        for _ in range(steps_before):
            _check_one_step(eng, continuous_step)
        eng.add_request([(i + j) % VOCAB for j in range(plen)],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while eng.has_unfinished_requests():
        _check_one_step(eng, continuous_step)


def _check_one_step(eng, continuous_step):
    sched = eng.scheduler
    running = [(r.request_id, r.num_tokens, r.num_computed_tokens) for r in sched.running]
    waiting = [(r.request_id, r.num_tokens) for r in sched.waiting]
    want = continuous_step(running, waiting, sched.config.max_num_batched_tokens, sched.config.max_num_seqs)
    out = sched.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == want
    # finish the step as the engine would
    rows = [i for i, c in enumerate(out.chunks) if c.request.num_computed_tokens == c.request.num_tokens]
    logits = eng.runner.execute(out.chunks, rows)
    sched.commit(out)
    for row, i in enumerate(rows):
        eng._append_token(out.chunks[i].request, int(logits[row].argmax()), eng.clock())
