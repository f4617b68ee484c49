"""Swap points: the engine runs a learner's function, only inside ``use`` or when built with it."""
import inspect
import re
from pathlib import Path

import pytest
import torch

from minfer.engine.llm_engine import LLMEngine
from minfer.lessons import engine_args, exercises, use
from minfer.lessons.swap import SWAP_POINTS, current, original
from minfer.model import rms_norm
from minfer.generate import generate_tokens
from minfer.sampling import SamplingParams
from tiny import tiny_config, tiny_model


def test_every_target_holds_the_exercises_reference():
    """The table is true: each target exists and is the function its exercise grades; each
    constructor swap point names an argument of the engine's constructor, the one it builds."""
    engine_params = inspect.signature(LLMEngine.from_model).parameters
    for point in SWAP_POINTS.values():
        assert bool(point.targets) != bool(point.engine_arg), point.name      # exactly one way in
        for target in point.targets:
            fn = current(target)
            assert callable(fn), target
            if point.exercise is not None:
                assert fn is exercises.get(point.exercise).load_reference(), target
        if point.engine_arg:
            assert point.engine_arg in engine_params, point.name
            assert list(engine_args(**{point.name: _slot_mapping})) == [point.engine_arg]


def test_the_table_names_only_real_flags():
    """Every ``--flag`` the table mentions is a flag of ``minfer generate``."""
    from minfer.cli import build_parser
    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
                    if a[0] == "generate")[1]
    flags = {s for a in generate._actions for s in a.option_strings}
    for point in SWAP_POINTS.values():
        for flag in re.findall(r"--[a-z][a-z-]*", point.when + point.contract):
            assert flag in flags, f"{point.name}: {flag} is not a flag of minfer generate"


def test_engine_points_go_through_the_constructor_only():
    with pytest.raises(ValueError, match="constructor"):
        with use(schedule_step=_slot_mapping):
            pass
    with pytest.raises(ValueError, match="run them with use"):
        engine_args(rms_norm=_own_rms_norm)
    assert engine_args(slot_mapping=None) == {}


def test_use_replaces_and_restores_even_on_error():
    def mine(x, weight, eps):
        return x
    before = {t: current(t) for p in SWAP_POINTS.values() for t in p.targets}
    with pytest.raises(RuntimeError):
        with use(rms_norm=mine, top_p=mine):
            assert current("minfer.model:rms_norm") is mine
            assert current("minfer.speculative.rejection:top_p_filter") is mine
            assert original("minfer.model:rms_norm") is rms_norm   # the grader's reference
            raise RuntimeError
    assert before == {t: current(t) for p in SWAP_POINTS.values() for t in p.targets}
    with pytest.raises(ValueError, match="no swap point named nope"):
        with use(nope=mine):
            pass
    with pytest.raises(ValueError, match="needs a function"):
        with use(rms_norm=3):
            pass


def _model():
    """A tiny random model whose greedy output varies (default init repeats one token)."""
    model = tiny_model(tiny_config(sliding_window=None, kv_share_group=1), seed=2)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(3)
    return model


def _tokens(model, engine=False, **functions):
    """Greedy tokens through the single-request loop, or through the engine (paged KV), built
    with the learner's ``functions`` at the constructor swap points."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompt = [1, 5, 9, 2, 7, 30, 41, 3]
    if engine:
        from minfer.llm import LLM
        llm = LLM.from_model(model, block_size=4, num_blocks=16, **engine_args(**functions))
        return llm.generate([prompt], params)[0].token_ids
    return list(generate_tokens(model, prompt, params))


def _own_rms_norm(x, weight, eps):        # a correct learner's function, written differently
    xd = x.double()
    return (xd / (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()).float()


def _slot_mapping(block_table, block_size, start_pos, num_tokens):
    return [block_table[p // block_size] * block_size + p % block_size
            for p in range(start_pos, start_pos + num_tokens)]


def _calls(fn, log):
    def wrapped(*args, **kw):
        log.append(1)
        return fn(*args, **kw)
    return wrapped


def test_engine_runs_the_learners_function():
    """Same greedy tokens as the engine with a correct function, different with a wrong one,
    and the learner's function is really called."""
    model = _model()
    want = _tokens(model)
    log: list = []
    with use(rms_norm=_calls(_own_rms_norm, log)):
        assert _tokens(model) == want
    assert log, "the engine never called the swapped-in function"
    with use(rms_norm=lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)):
        assert _tokens(model) != want
    assert _tokens(model) == want                 # restored


def test_engine_built_with_the_learners_slot_mapping():
    """Built with a correct slot mapping: the engine's tokens, every slot from the learner's
    function; with one that scrambles each block's order: other tokens."""
    model = _model()
    want = _tokens(model, engine=True)
    log: list = []
    assert _tokens(model, engine=True, slot_mapping=_calls(_slot_mapping, log)) == want
    assert log, "the engine never called the learner's slot mapping"
    wrong = lambda bt, bs, s, n: [bt[p // bs] * bs + bs - 1 - p % bs for p in range(s, s + n)]  # noqa: E731
    assert _tokens(model, engine=True, slot_mapping=wrong) != want
    assert _tokens(model, engine=True) == want


def test_engine_built_with_the_learners_attention():
    """The paged cache calls the learner's attention backend on the K/V it gathers."""
    from minfer.attention import reference_attention
    model = _model()
    want = _tokens(model, engine=True)
    log: list = []
    assert _tokens(model, engine=True, attention=_calls(reference_attention, log)) == want
    assert log, "the engine never called the learner's attention"
    zeros = lambda q, k, v, q_pos, k_pos, window=None, scale=None: torch.zeros_like(q)  # noqa: E731
    assert _tokens(model, engine=True, attention=zeros) != want


def test_flash_attention_runs_the_learners_online_softmax_update():
    """``--attention flash`` in the engine calls the swapped ``online_softmax_update``."""
    from minfer.attention.flash import online_softmax_update
    from minfer.llm import LLM
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM.from_model(_model(), attention="flash", block_size=4, num_blocks=16)
    want = llm.generate([[1, 5, 9, 2, 7]], params)[0].token_ids
    log: list = []
    with use(online_softmax_update=_calls(online_softmax_update, log)):
        assert llm.generate([[1, 5, 9, 2, 7]], params)[0].token_ids == want
    assert log, "the engine never called the swapped-in online_softmax_update"


@pytest.mark.slow      # loads SmolLM2 three times: about a minute
def test_use_solutions_runs_smollm2_on_the_notebooks_functions(smollm2_dir, tmp_path, capsys):
    """`minfer generate --use-solutions`: the lesson's rms_norm gives the engine's tokens;
    a wrong one in a copy of the notebook changes them; a stub is skipped."""
    import nbformat

    from minfer.cli import main
    from minfer.lessons.commands import load_solutions
    from minfer.lessons.notebooks import make_stub

    lesson = Path(__file__).resolve().parents[1] / "lessons" / "01_prefill_and_decode.ipynb"
    args = ["generate", "The capital of France is", "--model", str(smollm2_dir), "--temperature", "0",
            "--max-tokens", "8"]
    assert main(args) == 0
    engine = capsys.readouterr().out
    assert main(args + ["--use-solutions", str(lesson)]) == 0
    out = capsys.readouterr()
    assert out.out == engine and "running the engine with your rms_norm, top_p" in out.err

    nb = nbformat.read(lesson, as_version=4)
    for cell in nb.cells:
        if cell.source.startswith("def rms_norm("):
            cell.source = cell.source.replace("+ eps) * weight", "+ eps)")    # forgets the weight
        elif cell.source.startswith("def top_p("):
            cell.source = make_stub(cell.source)
    wrong = tmp_path / "mine.ipynb"
    nbformat.write(nb, wrong)
    assert list(load_solutions(str(wrong))) == ["rms_norm"]                # the stub is skipped
    assert main(args + ["--use-solutions", str(wrong)]) == 0
    assert capsys.readouterr().out != engine
    with pytest.raises(FileNotFoundError):
        load_solutions(str(tmp_path / "missing.ipynb"))


# ---------------------------------------------------------------- the scheduler's swap point

PROMPTS = [[(7 * i + j) % 97 for j in range(3 + 4 * i)] for i in range(6)]      # 3 to 23 tokens


def _serve(model, prompts=PROMPTS, **engine_args):
    """Greedy-generate ``prompts`` on an engine whose 14 blocks of 4 slots force preemptions.
    Returns (tokens per prompt, preemptions, the scheduler's decisions step by step)."""
    from minfer.llm import LLM

    args = dict(block_size=4, num_blocks=14, max_num_batched_tokens=16, max_num_seqs=4,
                enable_prefix_caching=False) | engine_args
    llm = LLM.from_model(model, **args)
    sched, decisions = llm.engine.scheduler, []
    schedule = sched.schedule

    def recorded():                                   # what each step decided, by request id
        out = schedule()
        decisions.append(([(c.request.request_id, c.start, c.num_tokens) for c in out.chunks],
                          [r.request_id for r in out.preempted]))
        return out
    sched.schedule = recorded
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    return [o.token_ids for o in outs], sum(o.metrics.num_preemptions for o in outs), decisions


@pytest.mark.usefixtures("one_thread")
def test_engine_runs_the_learners_scheduler_step():
    """The exercise's reference, swapped in, makes exactly the engine's decisions step by step
    (preemptions included), so the model produces the same greedy tokens. With prefix caching
    a preempted request comes back on its cached blocks (fewer tokens to compute)."""
    from minfer.lessons.ex_loops import schedule_step_reference

    model = _model()
    want, preemptions, decisions = _serve(model)
    assert preemptions > 0, "the pool should be small enough to preempt"
    log: list = []
    mine = engine_args(schedule_step=_calls(schedule_step_reference, log))
    assert _serve(model, **mine) == (want, preemptions, decisions)
    assert len(log) >= len(decisions), "the engine never asked the learner's scheduler step"
    assert _serve(model, enable_prefix_caching=True, **mine)[0] == want
    shared = [[50, 51, 52, 53] + p for p in PROMPTS]          # the first block is the same
    with pytest.raises(ValueError, match="running requests share KV blocks"):
        _serve(model, shared, enable_prefix_caching=True, **mine)


def _wrong_schedulers():
    from minfer.lessons.ex_loops import schedule_step_reference as ref
    return {
        "never preempts": (lambda r, w, b, m, f, bs: (ref(r, w, b, m, f, bs)[0], []),
                           {}, ValueError, "no free block"),
        "counts 50 blocks that do not exist": (lambda r, w, b, m, f, bs: ref(r, w, b, m, f + 50, bs),
                                               {}, ValueError, "no free block|blocks of 4 slots are free"),
        "admits past max_num_seqs": (lambda r, w, b, m, f, bs: ref(r, w, b, m + 3, f, bs),
                                     {"max_num_seqs": 2}, ValueError, "with max_num_seqs=2 requests running"),
        "drops the last request": (lambda r, w, b, m, f, bs: ref(r, w[:-1], b, m, f, bs),
                                   {}, RuntimeError, "scheduled nothing while 1 requests wait"),
    }


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(_wrong_schedulers()))
def test_a_wrong_scheduler_step_fails_clearly(name):
    """A step the pool or the limits cannot honour stops the run with a message naming it."""
    fn, kw, error, message = _wrong_schedulers()[name]
    with pytest.raises(error, match=message):
        _serve(_model(), **kw, **engine_args(schedule_step=fn))


def test_rebuild_keeps_the_engine_settings_and_runs_the_learners_functions():
    """``compare_with_engine`` and ``--use-solutions`` build a second engine on the same model:
    same settings and tokens, the learner's scheduler step and slot mapping called."""
    from minfer.lessons.ex_loops import schedule_step_reference
    from minfer.lessons.plug_ins import FunctionSlots, StepScheduler, rebuild
    from minfer.llm import LLM

    llm = LLM.from_model(_model(), block_size=4, num_blocks=14, max_num_seqs=3, max_num_batched_tokens=16,
                         enable_prefix_caching=False)
    slots, steps = [], []
    twin = rebuild(llm, slot_mapping=_calls(_slot_mapping, slots), schedule_step=_calls(schedule_step_reference, steps))
    assert twin.model is llm.model
    assert isinstance(twin.engine.scheduler, StepScheduler)
    assert isinstance(twin.engine.runner.kv_manager, FunctionSlots)
    for a, b in ((llm.engine, twin.engine),):
        assert a.config == b.config
        assert a.runner.kv_manager.pool.num_blocks == b.runner.kv_manager.pool.num_blocks
        assert a.runner.kv_manager.block_size == b.runner.kv_manager.block_size
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert [o.token_ids for o in twin.generate(PROMPTS, params)] == want
    assert slots and steps
    assert type(llm.engine.scheduler) is not StepScheduler          # the first engine is untouched


@pytest.mark.slow      # loads SmolLM2 three times
@pytest.mark.parametrize("lesson, name", [("03_attention_memory", "attention"),
                                          ("04_paged_attention", "slot_mapping"),
                                          ("05_batching_and_metrics", "schedule_step")])
def test_use_solutions_builds_the_engine_with_the_notebooks_function(smollm2_dir, capsys, lesson, name):
    from minfer.cli import main

    path = Path(__file__).resolve().parents[1] / "lessons" / f"{lesson}.ipynb"
    args = ["generate", "The capital of France is", "--model", str(smollm2_dir), "--temperature", "0",
            "--max-tokens", "8"]
    assert main(args) == 0
    engine = capsys.readouterr().out
    assert main(args + ["--use-solutions", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == engine and f"running the engine with your {name}" in out.err


def test_sampling_in_the_engine_runs_the_learners_top_p():
    """Temperature > 0 with top_p < 1 filters through the swapped ``top_p``; greedy never calls it."""
    from minfer.llm import LLM
    from minfer.sampling import top_p_filter

    llm = LLM.from_model(_model(), block_size=4, num_blocks=16)
    log: list = []
    with use(top_p=_calls(top_p_filter, log)):
        llm.generate([[1, 5, 9]], SamplingParams(temperature=0.0, max_tokens=3, top_p=0.9, ignore_eos=True))
        assert not log
        llm.generate([[1, 5, 9]], SamplingParams(temperature=0.8, max_tokens=3, top_p=0.9, ignore_eos=True))
    assert log, "the engine never called the swapped-in top_p"


def test_static_decode_step_runs_the_learners_padding():
    """Lesson 08: the static step takes its bucket and rows from the learner's functions; right ones
    give the eager engine's tokens, rows copied in the wrong order give other tokens."""
    from minfer.lessons.ex_compilers import pad_batch, pad_to_bucket
    from minfer.lessons.plug_ins import pad_static_rows
    from minfer.llm import LLM

    model, params = _model(), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[1, 5, 9, 2], [7, 30, 41], [3, 3, 8, 1, 6]]

    def tokens(pad=None):
        llm = LLM.from_model(model, block_size=4, num_blocks=16, max_num_seqs=4, enforce_eager=pad is None)
        if pad is not None:
            pad_static_rows(llm, _calls(pad_to_bucket, log), pad)
        return [o.token_ids for o in llm.generate(prompts, params)]
    log: list = []
    want = tokens()
    assert tokens(pad_batch) == want and log, "the static step never asked the learner's bucket"
    assert tokens(lambda t, p, s, c, n, x: [r[::-1] for r in pad_batch(t, p, s, c, n, x)]) != want
    with pytest.raises(ValueError, match="enforce_eager=False"):
        pad_static_rows(LLM.from_model(model, block_size=4, num_blocks=16), pad_to_bucket, pad_batch)


def test_handoff_runs_the_learners_prompt_kv():
    """Lesson 11: a request prefilled by one engine and decoded by another, with the K/V blocks the
    learner's ``prompt_kv`` picks, gives one engine's tokens; blocks in the wrong order do not."""
    from minfer.distributed.disagg import admit_prefilled, prompt_kv, take_prefilled
    from minfer.engine import LLMEngine
    from minfer.llm import LLM

    model, params = _model(), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = [1, 5, 9, 2, 7, 30, 41, 3, 8, 8, 2]

    def handed_off(gather):
        prefill, decode = (LLMEngine.from_model(model, block_size=4, num_blocks=16) for _ in range(2))
        rid = prefill.add_request(prompt, params)
        while not prefill.step():
            pass
        admit_prefilled(decode, *take_prefilled(prefill, rid, gather))
        while decode.has_unfinished_requests():
            decode.step()
        return decode.requests[rid].output_token_ids
    log: list = []
    want = LLM.from_model(model, block_size=4, num_blocks=16).generate([prompt], params)[0].token_ids
    assert handed_off(_calls(prompt_kv, log)) == want and log
    assert handed_off(lambda k, v, t, n: tuple(x.flip(1) for x in prompt_kv(k, v, t, n))) != want
