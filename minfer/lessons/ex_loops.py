"""Cumulative exercises: whole loops that drive a model (greedy decode, paged decode attention,
a scheduler step with preemption, speculative decoding), graded on tiny random models.

The learner's loop gets a ``CountingModel``, which logs the shape of every forward, so the grader
checks the *way* the answer was computed (one prefill, then one token per step), not only the tokens.
"""
from functools import lru_cache
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from minfer.kv.block_pool import BlockPool, KVCacheManager, compute_slot_mapping
from minfer.lessons.ex_metrics import schedule_once
from minfer.lessons.registry import (Exercise, Inputs, close_problem, float_tensors, register, tuple_close,
                                     tuple_problem)

PAGED_ATOL = 1e-5

# What a loop exercise's solution may use: the engine's model and contiguous KV cache.
LOOP_HELPERS = dict(
    prelude="import math\nimport torch\nfrom minfer.kv import ContiguousKVCache\n",
    allowed=("minfer.kv:ContiguousKVCache", "minfer.kv.contiguous:*", "minfer.model:*",
             "minfer.lessons.ex_loops:CountingModel.*"))


@lru_cache(maxsize=None)
def tiny_lm(seed: int):
    """A 2-layer random Llama (vocab 97, GQA 4:2), weights scaled up so greedy output varies."""
    from minfer.config import ModelConfig
    from minfer.model import build_model

    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, rope_theta=10000.0)
    model = build_model(cfg, seed=seed, dtype=torch.float32)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(3)
    return model.eval()


class CountingModel:
    """``tiny_lm(seed)``, recording the (B, T) shape of every forward in ``calls``: call it as
    ``model(input_ids (B, T), positions (B, T), kv_cache=cache, last_only=...) -> logits``. The
    learner's process rebuilds it from ``seed``."""

    def __init__(self, seed: int):
        self.seed, self.inner, self.calls = seed, tiny_lm(seed), []
        self.cfg = self.inner.cfg

    def __call__(self, input_ids, positions, kv_cache=None, **kw):
        self.calls.append((tuple(input_ids.shape), kv_cache is not None))
        with torch.no_grad():
            return self.inner(input_ids, positions, kv_cache=kv_cache, **kw)

    def __getattr__(self, name):      # cfg, inv_freq, model, ...: the inner model's
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<tiny random model, seed {self.seed}>"


def greedy_decode_reference(model, prompt_ids, max_new_tokens, eos_id):
    """The engine's loop (``generate_tokens``, contiguous cache, greedy) on the same model."""
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams

    model.calls.clear()              # the learner's forwards are logged from here on
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    eos = [] if eos_id is None else [eos_id]
    return list(generate_tokens(model.inner, list(prompt_ids), params, eos_token_ids=eos))


def _compare_decode(inputs: Inputs, expected: Any, actual: Any) -> Optional[str]:
    if not isinstance(actual, list) or not all(isinstance(t, int) for t in actual):
        return f"returned {type(actual).__name__}, expected a list of int token ids"
    if actual != expected:
        first = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b),
                     min(len(expected), len(actual)))
        return (f"tokens differ from new token {first} on: expected {expected}, yours {actual}"
                + (f" (stop after eos_id {inputs['eos_id']}, which is included)"
                   if inputs.get("eos_id") in expected else ""))
    return None


def _validate_decode(inputs: Inputs, actual: list) -> Optional[str]:
    """One prefill over the whole prompt, then one single-token forward per further token."""
    calls = inputs["model"].calls
    n_prompt = len(inputs["prompt_ids"])
    want = [((1, n_prompt), True)] + [((1, 1), True)] * (len(actual) - 1)
    if calls != want:
        return (f"the forwards should be one prefill of shape (1, {n_prompt}) with the cache, then "
                f"{len(actual) - 1} decode steps of shape (1, 1) with the cache; yours were "
                f"{[c[0] for c in calls]}" + ("" if all(c[1] for c in calls) else
                                             " and some ran without kv_cache"))
    return None


register(Exercise(
    name="generate.greedy_decode",
    lesson="02_kv_cache", function="greedy_decode",
    description=("greedy_decode(model, prompt_ids, max_new_tokens, eos_id) -> new token ids: prefill "
                 "once, then one cached single-token forward per token, the engine's tokens"),
    reference="minfer.lessons.ex_loops:greedy_decode_reference",
    inputs=st.builds(dict, model=st.integers(0, 3).map(CountingModel),
                     prompt_ids=st.lists(st.integers(0, 96), min_size=1, max_size=8),
                     max_new_tokens=st.integers(1, 10), eos_id=st.one_of(st.none(), st.integers(0, 96))),
    compare=_compare_decode,
    validate=_validate_decode,
    max_examples=30,
    **LOOP_HELPERS,
))


@st.composite
def _paged_inputs(draw) -> Inputs:
    B, nkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hd, bs = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    nh = nkv * group
    lens = draw(st.lists(st.integers(1, 9), min_size=B, max_size=B))
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + draw(st.integers(0, 2))
    order = draw(st.permutations(range(num_blocks)))            # scattered, not in order
    tables, at = [], 0
    for n in need:
        tables.append(list(order[at:at + n]))
        at += n
    pool = (num_blocks, bs, nkv, hd)
    shapes = {"q": (B, nh, hd), "k": (B, nkv, hd), "v": (B, nkv, hd), "k_pool": pool, "v_pool": pool}
    tensors = {name: draw(float_tensors(shape, -2.0, 2.0)) for name, shape in shapes.items()}
    return {**tensors, "block_tables": tables, "context_lens": lens}


def paged_decode_attention_reference(q, k, v, k_pool, v_pool, block_tables, context_lens):
    """The engine's pieces: ``compute_slot_mapping`` for the writes, then the engine's one reference
    of paged attention (``minfer.attention.paged.paged_attention_reference``)."""
    from minfer.attention.paged import paged_attention_reference

    bs = k_pool.shape[1]
    flat_k, flat_v = k_pool.view(-1, *k_pool.shape[2:]), v_pool.view(-1, *v_pool.shape[2:])
    for b, (table, n) in enumerate(zip(block_tables, context_lens)):
        (slot,) = compute_slot_mapping(table, bs, n - 1, 1)
        flat_k[slot], flat_v[slot] = k[b], v[b]
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables])    # (B, max blocks)
    out = paged_attention_reference(q, k_pool, v_pool, tables, torch.tensor(context_lens))
    return out, k_pool, v_pool


def _validate_paged(inputs: Inputs, actual: Any) -> Optional[str]:
    """softmax(q . K / sqrt(hd)) V in float64, K/V read position by position through the table."""
    q, k, v = inputs["q"].double(), inputs["k"].double(), inputs["v"].double()
    kp, vp = inputs["k_pool"].double(), inputs["v_pool"].double()
    bs, nh, nkv = kp.shape[1], q.shape[1], k.shape[1]
    want = torch.empty_like(q)
    for b, (table, n) in enumerate(zip(inputs["block_tables"], inputs["context_lens"])):
        keys = torch.stack([kp[table[p // bs], p % bs] for p in range(n - 1)] + [k[b]])    # (n, nkv, hd)
        vals = torch.stack([vp[table[p // bs], p % bs] for p in range(n - 1)] + [v[b]])
        for h in range(nh):
            g = h // (nh // nkv)
            w = torch.softmax(keys[:, g] @ q[b, h] / q.shape[-1] ** 0.5, 0)               # (n,)
            want[b, h] = w @ vals[:, g]
    return close_problem(want, actual[0], PAGED_ATOL, what="definition (float64)")


register(Exercise(
    name="paged.decode_attention",
    lesson="04_paged_attention", function="paged_decode_attention",
    description=("paged_decode_attention(q, k, v, k_pool, v_pool, block_tables, context_lens) -> "
                 "(out, k_pool, v_pool): write each new K/V into its slot, attend over the blocks"),
    reference="minfer.lessons.ex_loops:paged_decode_attention_reference",
    inputs=_paged_inputs(),
    compare=lambda inputs, expected, actual: tuple_close(("out", "k_pool", "v_pool"), expected, actual,
                                                         PAGED_ATOL),
    validate=_validate_paged,
))


@st.composite
def _spec_inputs(draw) -> Inputs:
    seed = draw(st.integers(0, 2))
    same = draw(st.booleans())               # the draft is the target itself: every guess accepted
    return {"target": CountingModel(seed), "draft": CountingModel(seed if same else 3),
            "prompt_ids": draw(st.lists(st.integers(0, 96), min_size=1, max_size=6)),
            "max_new_tokens": draw(st.integers(1, 12)), "gamma": draw(st.integers(1, 4))}


def speculative_greedy_reference(target, draft, prompt_ids, max_new_tokens, gamma):
    """What the loop must produce: the engine's plain greedy tokens of ``target`` (no EOS)."""
    draft.calls.clear()
    return greedy_decode_reference(target, prompt_ids, max_new_tokens, None)


def _validate_spec(inputs: Inputs, actual: list) -> Optional[str]:
    """The target verifies: one prefill, then forwards of 2 .. gamma + 1 tokens, all cached
    (the last may be a single token: nothing to guess when one token is left);
    with the target as its own draft every guess is accepted, so each step gains gamma + 1."""
    calls, n_prompt, gamma = inputs["target"].calls, len(inputs["prompt_ids"]), inputs["gamma"]
    shapes = [c[0] for c in calls]
    if not calls or shapes[0] != (1, n_prompt) or not all(c[1] for c in calls):
        return (f"the target should run one cached prefill of shape (1, {n_prompt}) first; "
                f"its forwards were {shapes}" + ("" if all(c[1] for c in calls) else
                                                 ", some without kv_cache"))
    bad = [s for s in shapes[1:] if not 1 <= s[1] <= gamma + 1] + \
        [s for s in shapes[1:-1] if s[1] < 2]
    if bad:
        return (f"after the prefill each target forward verifies the last token plus 1 .. gamma = "
                f"{gamma} guesses, shape (1, 2 .. {gamma + 1}) (only the last may have no guess, "
                f"when one token is left); yours had {bad} (all: {shapes})")
    if inputs["draft"].seed == inputs["target"].seed:
        want = 1 + -(-(inputs["max_new_tokens"] - 1) // (gamma + 1))
        if len(calls) != want:
            return (f"the draft is the target itself, so every guess is right and each verify "
                    f"step should gain gamma + 1 = {gamma + 1} tokens: {want} target forwards "
                    f"in all, yours took {len(calls)} ({shapes})")
    return None


register(Exercise(
    name="speculative.greedy_loop",
    lesson="07_speculative_decoding", function="speculative_greedy",
    description=("speculative_greedy(target, draft, prompt_ids, max_new_tokens, gamma) -> the "
                 "target's greedy tokens, gamma draft guesses verified per target forward"),
    reference="minfer.lessons.ex_loops:speculative_greedy_reference",
    inputs=_spec_inputs(),
    compare=_compare_decode,
    validate=_validate_spec,
    max_examples=30,
    **LOOP_HELPERS,
))


@st.composite
def _schedule_inputs(draw) -> Inputs:
    bs = draw(st.integers(1, 4))
    running = []
    for i in range(draw(st.integers(0, 4))):
        computed, left = draw(st.integers(1, 12)), draw(st.integers(1, 8))
        lo, hi = -(-computed // bs), -(-(computed + left) // bs)
        running.append((f"r{i}", computed + left, computed, draw(st.integers(lo, hi))))
    waiting = [(f"w{i}", draw(st.integers(1, 12))) for i in range(draw(st.integers(0, 3)))]
    return {"running": running, "waiting": waiting, "token_budget": draw(st.integers(1, 16)),
            "max_num_seqs": draw(st.integers(max(1, len(running)), 5)),
            "num_free_blocks": draw(st.integers(0, 6)), "block_size": bs}


def schedule_step_reference(running, waiting, token_budget, max_num_seqs, num_free_blocks,
                            block_size):
    """The engine's ``Scheduler.schedule`` (continuous policy, no prefix caching) on this state."""
    held = sum(r[3] for r in running)
    # One more block, held by a sequence outside this step (a pool cannot be empty).
    kv = KVCacheManager(BlockPool(held + num_free_blocks + 1, block_size, enable_prefix_caching=False))
    kv.allocate("(another sequence)", [1] * block_size)
    running = [(rid, n, computed, blocks * block_size) for rid, n, computed, blocks in running]
    out = schedule_once(kv, "continuous", running, waiting, token_budget, max_num_seqs)
    return ([(c.request.request_id, c.num_tokens) for c in out.chunks],
            [r.request_id for r in out.preempted])


def _compare_schedule(inputs: Inputs, expected: Any, actual: Any) -> Optional[str]:
    problem = tuple_problem(actual, ("scheduled", "preempted"))
    if problem:
        return problem.replace("tensors", "lists")
    scheduled, preempted = [list(map(tuple, x)) if i == 0 else list(x) for i, x in enumerate(actual)]
    if preempted != expected[1]:
        return (f"preempted {preempted}, expected {expected[1]}: when a running request needs a "
                f"block and none is free, the newest running request gives its blocks back, "
                f"and nobody new is admitted in that step")
    if scheduled != expected[0]:
        return f"scheduled {scheduled}, expected {expected[0]}"
    return None


def _validate_schedule(inputs: Inputs, actual: Any) -> Optional[str]:
    """Invariants: the budget holds, and the blocks used fit in the free ones plus the victims'."""
    scheduled, preempted = actual
    if sum(n for _, n in scheduled) > inputs["token_budget"]:
        return "more tokens scheduled than the token budget"
    bs, run = inputs["block_size"], {r[0]: r for r in inputs["running"]}
    free = inputs["num_free_blocks"] + sum(run[v][3] for v in preempted)
    waiting = dict(inputs["waiting"])
    need = sum(max(0, -(-(run[rid][2] + n) // bs) - run[rid][3]) if rid in run else -(-waiting[rid] // bs)
               for rid, n in scheduled)
    return None if need <= free else f"the step uses {need} new blocks but only {free} are free"


register(Exercise(
    name="serving.schedule_step",
    lesson="05_batching_and_metrics", function="schedule_step",
    description=("schedule_step(running, waiting, token_budget, max_num_seqs, num_free_blocks, "
                 "block_size) -> (scheduled, preempted): continuous batching with KV blocks"),
    reference="minfer.lessons.ex_loops:schedule_step_reference",
    inputs=_schedule_inputs(),
    compare=_compare_schedule,
    validate=_validate_schedule,
))
