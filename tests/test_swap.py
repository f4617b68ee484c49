"""Swap points: the engine runs a learner's function, and only inside ``use``."""
from pathlib import Path

import pytest
import torch

from minfer.lessons import exercises, use
from minfer.lessons.swap import SWAP_POINTS, current, original
from minfer.model import rms_norm
from minfer.generate import generate_tokens
from minfer.sampling import SamplingParams
from tiny import tiny_config, tiny_model


def test_every_target_holds_the_exercises_reference():
    """The table is true: each target exists and is the function its exercise grades."""
    for point in SWAP_POINTS.values():
        for target in point.targets:
            fn = current(target)
            if fn is None:               # a hook: the engine's own code runs (schedule_step, see below)
                assert point.name == "schedule_step", target
                continue
            assert callable(fn), target
            if point.exercise is not None:
                assert fn is exercises.get(point.exercise).load_reference(), target


def test_use_replaces_and_restores_even_on_error():
    def mine(x, weight, eps):
        return x
    before = {t: current(t) for p in SWAP_POINTS.values() for t in p.targets}
    with pytest.raises(RuntimeError):
        with use(rms_norm=mine, attention=mine):
            assert current("minfer.model:rms_norm") is mine
            assert current("minfer.attention:BACKENDS[flash]") is mine
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


def _tokens(model, engine=False):
    """Greedy tokens through the single-request loop, or through the engine (paged KV: the slot mapping)."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompt = [1, 5, 9, 2, 7, 30, 41, 3]
    if engine:
        from minfer.llm import LLM
        return LLM.from_model(model, block_size=4, num_blocks=16).generate([prompt], params)[0].token_ids
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


@pytest.mark.parametrize("kw, right, wrong", [
    ({}, {"rms_norm": _own_rms_norm},
     {"rms_norm": lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)}),
    ({"engine": True}, {"slot_mapping": _slot_mapping},
     {"slot_mapping": lambda bt, bs, s, n: [bt[p // bs] * bs + bs - 1 - p % bs for p in range(s, s + n)]}),
], ids=["rms_norm", "slot_mapping"])
def test_engine_runs_the_learners_function(kw, right, wrong):
    """Same greedy tokens as the engine with a correct function, different with a wrong one,
    and the learner's function is really called."""
    model = _model()
    want = _tokens(model, **kw)
    log: list = []
    name, fn = next(iter(right.items()))
    with use(**{name: _calls(fn, log)}):
        assert _tokens(model, **kw) == want
    assert log, "the engine never called the swapped-in function"
    with use(**wrong):
        assert _tokens(model, **kw) != want
    assert _tokens(model, **kw) == want                 # restored


def test_engine_runs_the_learners_attention():
    from minfer.attention import reference_attention
    model = _model()
    want = _tokens(model)
    with use(attention=reference_attention):
        assert _tokens(model) == want
    with use(attention=lambda q, k, v, q_pos, k_pos, window=None, scale=None: torch.zeros_like(q)):
        assert _tokens(model) != want


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
    with use(schedule_step=_calls(schedule_step_reference, log)):
        assert _serve(model) == (want, preemptions, decisions)
        assert _serve(model, enable_prefix_caching=True)[0] == want
        shared = [[50, 51, 52, 53] + p for p in PROMPTS]          # the first block is the same
        with pytest.raises(ValueError, match="running requests share KV blocks"):
            _serve(model, shared, enable_prefix_caching=True)
    assert len(log) >= len(decisions), "the engine never asked the swapped-in scheduler"
    assert _serve(model)[2] == decisions                  # restored


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
    """A step the pool or the limits cannot honour stops the run with a message naming it,
    and the engine's own scheduler is back afterwards."""
    fn, kw, error, message = _wrong_schedulers()[name]
    model = _model()
    want = _serve(model, **kw)
    with use(schedule_step=fn):
        with pytest.raises(error, match=message):
            _serve(model, **kw)
    assert _serve(model, **kw) == want
