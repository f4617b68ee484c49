"""Speculative decoding, prompt lookup and lookahead decoding never change the target's output.

* greedy: every method is token-identical to plain greedy decoding (``generate_tokens``)
  on random tiny models, prompts, gamma and window sizes;
* sampling: one speculative step's output distribution, computed by enumeration on a
  tiny vocabulary, equals the target's to float precision; a seeded chi-square test
  of the sampler (and, marked slow, of the whole loop) does not reject;
* edge cases: gamma = 1, all accepted, all rejected, draft == target, EOS inside an
  accepted run, max_tokens mid-run, the context-length limit.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import first_difference, tiny_config, tiny_configs, tiny_model

from minfer.generate import generate_tokens
from minfer.sampling import SamplingParams
from minfer.speculative import (SpecStats, SpeculativeConfig, TreeAttentionCache, accept_reject,
                                expected_tokens_per_step, generate_speculative, layer_skip_draft,
                                ngram_propose, residual_distribution, step_layout, verify_greedy,
                                verify_sampled)
from minfer.speculative.loop import speculative_generate

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def lively_model(cfg, seed: int, std: float):
    """A random tiny model whose greedy output is varied (std 0.02 init mostly repeats one token)."""
    m = tiny_model(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def perturbed(model, seed: int, noise: float):
    """A copy of ``model`` with Gaussian noise on every weight: a draft that mostly agrees."""
    import copy
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return d


def plain(model, prompt, params, eos=()):
    return list(generate_tokens(model, prompt, params, eos_token_ids=list(eos)))


def spec(model, prompt, params, config, draft=None, eos=(), stats=None):
    return list(generate_speculative(model, prompt, params, config, draft=draft,
                                     eos_token_ids=list(eos), stats=stats))


@st.composite
def setups(draw):
    """A lively tiny model (any attention layout), a prompt with repeats, a greedy budget."""
    cfg = draw(tiny_configs())
    model = lively_model(cfg, draw(st.integers(0, 2**16)), draw(st.sampled_from([0.02, 0.1, 0.3, 0.6])))
    piece = draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=1, max_size=8))
    prompt = draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=0, max_size=6)) + piece * draw(
        st.integers(1, 3))
    params = SamplingParams(temperature=0, max_tokens=draw(st.integers(1, 24)), ignore_eos=True)
    return model, prompt, params


# ---------------------------------------------------------------------------
# Greedy: every method equals plain greedy decoding
# ---------------------------------------------------------------------------


@SETTINGS
@given(setups(), st.integers(1, 6), st.integers(1, 3), st.integers(1, 4), st.integers(0, 1))
def test_prompt_lookup_greedy_equals_plain(setup, k, lo, extra, adaptive):
    model, prompt, params = setup
    want = plain(model, prompt, params)
    got = spec(model, prompt, params, SpeculativeConfig("prompt_lookup", num_speculative_tokens=k, adaptive=adaptive,
                                                        prompt_lookup_min=lo, prompt_lookup_max=lo + extra - 1))
    assert got == want, first_difference(got, want)


@SETTINGS
@given(setups(), st.integers(1, 5), st.sampled_from(["other", "noisy", "same", "layers"]), st.integers(0, 99))
def test_draft_model_greedy_equals_plain(setup, gamma, kind, seed):
    model, prompt, params = setup
    cfg = model.cfg
    draft = {"other": lambda: lively_model(cfg, seed, 0.3),
             "noisy": lambda: perturbed(model, seed, 0.02),
             "same": lambda: model,
             "layers": lambda: layer_skip_draft(model, 1 + seed % cfg.num_hidden_layers)}[kind]()
    stats = SpecStats()
    want = plain(model, prompt, params)
    got = spec(model, prompt, params, SpeculativeConfig("draft", "x", num_speculative_tokens=gamma),
               draft=draft, stats=stats)
    assert got == want, first_difference(got, want)
    if kind == "same":
        assert stats.acceptance_rate in (None, 1.0), stats.summary()


@SETTINGS
@given(setups(), st.integers(1, 5), st.integers(2, 5), st.integers(1, 4))
def test_lookahead_greedy_equals_plain(setup, window, ngram, cands):
    model, prompt, params = setup
    want = plain(model, prompt, params)
    got = spec(model, prompt, params, SpeculativeConfig("lookahead", window=window, ngram=ngram,
                                                        max_candidates=cands))
    assert got == want, first_difference(got, want)


def test_lookahead_accepts_on_a_repetitive_model():
    """The Jacobi branch must find n-grams that verify (else lookahead is only exact, never fast)."""
    model = lively_model(tiny_config(vocab_size=32), 3, 0.1)
    prompt, params = [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    stats = SpecStats()
    assert spec(model, prompt, params, "lookahead:W=4,N=3,G=4", stats=stats) == plain(model, prompt, params)
    assert sum(stats.accepted) > 0, stats.summary()


# ---------------------------------------------------------------------------
# The lookahead step: mask and tree attention
# ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.lists(st.integers(1, 4), max_size=3), st.integers(0, 50))
def test_step_layout_every_token_sees_one_causal_sequence(W, levels, cand_lens, P):
    """Each query sees exactly one token per position P, P+1, ..., its own position: a causal sequence."""
    lay = step_layout(7, P, [[0] * W for _ in range(levels)], [[1] * n for n in cand_lens])
    pos = torch.tensor(lay.positions)
    for q in range(len(lay.tokens)):
        seen = sorted(pos[lay.mask[q]].tolist())
        assert seen == list(range(P, int(pos[q]) + 1)), (q, seen, lay.positions)


def test_tree_attention_cache_matches_plain_causal_forward():
    """Candidates scored side by side (tree mask) get the logits of scoring each one alone."""
    cfg = tiny_config(sliding_window=4)
    model = lively_model(cfg, 0, 0.3)
    prompt, cands = [5, 9, 2, 7, 7, 1], [[3, 4, 5], [3, 8], [6]]
    from minfer.kv import ContiguousKVCache
    cache = ContiguousKVCache(cfg, 1, 32)
    P = len(prompt) - 1
    with torch.no_grad():
        model(torch.tensor([prompt[:-1]]), torch.arange(P)[None], kv_cache=cache)
        lay = step_layout(prompt[-1], P, [[1, 2], [3, 4]], cands)
        tree = TreeAttentionCache(cache, lay.mask)
        logits = model(torch.tensor([lay.tokens]), torch.tensor([lay.positions]), kv_cache=tree)[0]
        for c, idx in zip(cands, lay.candidates):
            full = prompt + c
            want = model(torch.tensor([full]), torch.arange(len(full))[None])[0, P:]
            got = logits[[0] + idx]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tree.commit([0] + lay.candidates[0])        # then decode on: same as the plain cached path
        nxt = model(torch.tensor([[9]]), torch.tensor([[P + 4]]), kv_cache=cache)[0, -1]
        full = prompt + cands[0] + [9]
        torch.testing.assert_close(nxt, model(torch.tensor([full]), torch.arange(len(full))[None])[0, -1],
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Sampling: the accept/reject rule keeps the target's distribution
# ---------------------------------------------------------------------------


@st.composite
def distributions(draw, V):
    w = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=V, max_size=V)), dtype=torch.float64)
    kind = draw(st.sampled_from(["dense", "dense", "sparse", "one-hot"]))
    if kind == "one-hot":
        w = torch.zeros(V, dtype=torch.float64)
        w[draw(st.integers(0, V - 1))] = 1
    elif kind == "sparse":
        w = w * (torch.arange(V) % 2 == draw(st.integers(0, 1)))
    if float(w.sum()) < 1e-3:
        w = torch.ones(V, dtype=torch.float64)
    return w / w.sum()


@settings(max_examples=200, deadline=None)
@given(st.integers(4, 8).flatmap(lambda V: st.tuples(distributions(V), distributions(V))))
def test_one_position_output_distribution_is_exactly_p(pq):
    """sum_x q(x) [a(x) 1{y = x} + (1 - a(x)) r(y)] = p(y), by enumeration over the draft token x."""
    p, q = pq
    out = torch.zeros_like(p)
    for x in range(len(p)):
        if q[x] == 0:
            continue
        a, r = accept_reject(p, q, x)
        out[x] += q[x] * a
        out += q[x] * (1 - a) * r
    torch.testing.assert_close(out, p, atol=1e-12, rtol=0)


def exact_step_distribution(P, Q, start: int, gamma: int, deterministic: bool = False) -> torch.Tensor:
    """Exact distribution of the first gamma + 1 tokens when ONE speculative step runs from ``start``
    and plain target sampling completes the rest; P, Q (V, V) Markov tables (row = previous token).

    Enumerates every draft sequence (V^gamma) and every accept/reject path using ``accept_reject``.
    ``deterministic``: the draft proposes argmax Q instead of sampling (q = one-hot), like prompt lookup.
    """
    V = P.shape[0]
    out = torch.zeros((V,) * (gamma + 1), dtype=torch.float64)

    def complete(prefix, prob):             # spread prob over completions under the target
        if len(prefix) == gamma + 1:
            out[tuple(prefix)] += prob
            return
        for y in range(V):
            if P[prefix[-1], y] > 0:
                complete(prefix + [y], prob * P[prefix[-1], y])

    for drafts in itertools.product(range(V), repeat=gamma):
        prev, prob_draft = start, 1.0
        qs = []
        for x in drafts:
            qx = torch.nn.functional.one_hot(Q[prev].argmax(), V).double() if deterministic else Q[prev]
            prob_draft *= float(qx[x])
            qs.append(qx)
            prev = x
        if prob_draft == 0:
            continue
        prev, prob = start, prob_draft
        for i, x in enumerate(drafts):
            a, r = accept_reject(P[prev], qs[i], x)
            for y in range(V):                       # rejected at i: residual token y, then the target
                if (1 - a) * r[y] > 0:
                    complete(list(drafts[:i]) + [y], prob * (1 - a) * float(r[y]))
            prob *= a
            prev = x
            if prob == 0:
                break
        else:
            for y in range(V):                       # all accepted: the bonus token
                if P[prev, y] > 0:
                    out[tuple(drafts) + (y,)] += prob * float(P[prev, y])
    return out


def target_joint(P, start, n):
    out = torch.zeros((P.shape[0],) * n, dtype=torch.float64)
    for seq in itertools.product(range(P.shape[0]), repeat=n):
        prob, prev = 1.0, start
        for y in seq:
            prob, prev = prob * float(P[prev, y]), y
        out[seq] = prob
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 6).flatmap(lambda V: st.tuples(st.lists(distributions(V), min_size=V, max_size=V),
                                                     st.lists(distributions(V), min_size=V, max_size=V))),
       st.integers(1, 3), st.booleans())
def test_one_step_sequence_distribution_is_exactly_the_targets(tables, gamma, deterministic):
    """Over whole sequences: one step of gamma drafts (+ target completion) has the target's joint law."""
    P, Q = (torch.stack(t) for t in tables)
    V = P.shape[0]
    if V ** gamma > 300:
        gamma = 1
    got = exact_step_distribution(P, Q, 0, gamma, deterministic)
    torch.testing.assert_close(got, target_joint(P, 0, gamma + 1), atol=1e-12, rtol=0)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit (cells with expected count < 5 are pooled)."""
    n = float(counts.sum())
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("deterministic", [False, True])
def test_chi_square_of_sampled_steps(deterministic):
    """``verify_sampled`` (the code the loop runs), 4000 seeded steps: the first two tokens follow p."""
    g = torch.Generator().manual_seed(1234)
    V, gamma, N = 5, 2, 4000
    P = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1).double()
    Q = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1).double()
    counts = torch.zeros(V, V)
    for _ in range(N):
        drafts, qs, prev = [], [], 0
        for _ in range(gamma):
            q = torch.nn.functional.one_hot(Q[prev].argmax(), V).double() if deterministic else Q[prev]
            x = int(torch.multinomial(q, 1, generator=g))
            drafts, qs, prev = drafts + [x], qs + [q], x
        p_rows = torch.stack([P[t] for t in [0] + drafts])                  # (gamma + 1, V)
        out = verify_sampled(p_rows, None if deterministic else torch.stack(qs), drafts, g)
        second = out[1] if len(out) > 1 else int(torch.multinomial(P[out[0]], 1, generator=g))
        counts[out[0], second] += 1
    pvalue = chi_square_pvalue(counts.flatten(), target_joint(P, 0, 2).flatten())
    assert pvalue > 1e-3, f"chi-square p-value {pvalue:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["draft", "prompt_lookup"])
def test_chi_square_of_the_whole_loop(method):
    """The full speculative loop on a tiny model, 1500 seeds: the first 2 tokens follow the target's law."""
    cfg = tiny_config(vocab_size=6, max_position_embeddings=32)
    target, draft = lively_model(cfg, 0, 0.5), lively_model(cfg, 1, 0.5)
    prompt = [1, 2, 3, 1, 2]
    from minfer.naive import naive_forward
    with torch.no_grad():
        p1 = torch.softmax(naive_forward(target.state_dict(), cfg, prompt)[-1].double(), -1)
        joint = torch.stack([p1[a] * torch.softmax(naive_forward(target.state_dict(), cfg, prompt + [a])[-1]
                                                   .double(), -1) for a in range(6)])
    counts = torch.zeros(6, 6)
    config = SpeculativeConfig("draft", "x", num_speculative_tokens=3) if method == "draft" else \
        SpeculativeConfig("prompt_lookup", num_speculative_tokens=3)
    for seed in range(1500):
        out = spec(target, prompt, SamplingParams(temperature=1.0, max_tokens=2, seed=seed, ignore_eos=True),
                   config, draft=draft)
        counts[out[0], out[1]] += 1
    pvalue = chi_square_pvalue(counts.flatten(), joint.flatten())
    assert pvalue > 1e-3, f"chi-square p-value {pvalue:.2e}"


# ---------------------------------------------------------------------------
# Through the engine: every request proposes, one batched forward verifies them all
# ---------------------------------------------------------------------------


def medusa_heads(tmp_dir, cfg, seed: int, num_heads: int = 3) -> str:
    """A folder of random Medusa heads for a tiny model (their guesses are poor, which is fine)."""
    from minfer.speculative.medusa import MedusaHeads
    heads = MedusaHeads(cfg.hidden_size, num_heads)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return str(heads.save(f"{tmp_dir}/medusa-{seed}-{num_heads}"))


def engine_spec(model, prompts, params, config, draft=None, **engine_args):
    """``LLM.from_model(speculative=...)``: the prompts batched through ``SpecDecodeEngine``."""
    from minfer.llm import LLM
    llm = LLM.from_model(model, speculative=config, draft=draft, block_size=4, **engine_args)
    return [o.token_ids for o in llm.generate(prompts, params)], llm


def engine_prompts(prompt, vocab):
    """The drawn prompt and three variations of it, so that requests of different lengths share steps."""
    return [prompt or [0], list(reversed(prompt)) or [1], prompt + prompt[:3], [(t + 1) % vocab for t in prompt] or [2]]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups(), st.sampled_from(["prompt_lookup", "draft", "layers", "medusa"]), st.integers(1, 5),
       st.integers(0, 99))
def test_engine_greedy_equals_plain(tmp_path_factory, setup, method, k, seed):
    """Greedy through the engine equals plain greedy for every request of the batch, every method."""
    model, prompt, params = setup
    cfg, draft = model.cfg, None
    if method == "prompt_lookup":
        config = SpeculativeConfig("prompt_lookup", num_speculative_tokens=k, prompt_lookup_min=1)
    elif method == "medusa":
        config = SpeculativeConfig("medusa", medusa_heads(tmp_path_factory.mktemp("h"), cfg, seed, 1 + k % 3))
    else:
        config = SpeculativeConfig("draft", "x", num_speculative_tokens=k)
        draft = perturbed(model, seed, 0.02) if method == "draft" else layer_skip_draft(model, 1)
    prompts = engine_prompts(prompt, cfg.vocab_size)
    got, _ = engine_spec(model, prompts, params, config, draft, max_num_batched_tokens=16 + 8 * (seed % 3))
    for p, g in zip(prompts, got):
        want = plain(model, p, params)
        assert g == want, first_difference(g, want)


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_engine_verifies_eight_requests_in_one_forward_per_step():
    """8 prompts, one engine: far fewer target forwards than 8 single-request loops, same tokens."""
    cfg = tiny_config(vocab_size=50)
    target = lively_model(cfg, 3, 0.3)
    draft = perturbed(target, 1, 0.02)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (6,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    config = SpeculativeConfig("draft", "x", num_speculative_tokens=3)
    calls = count_forwards(target)
    loops = [spec(target, p, params, config, draft=draft) for p in prompts]
    loop_forwards, calls[:] = len(calls), []
    got, llm = engine_spec(target, prompts, params, config, draft)
    assert got == loops
    assert len(calls) == llm.engine.num_steps                        # one target forward per engine step
    assert len(calls) * 4 < loop_forwards, (len(calls), loop_forwards)
    stats = llm.generate(prompts[:1], params)[0].spec_stats
    assert stats.num_steps < params.max_tokens - 1 and stats.acceptance_rate > 0.25, stats.summary()


@pytest.mark.parametrize("method", ["draft", "prompt_lookup", "medusa"])
def test_engine_chi_square_of_sampled_tokens(tmp_path, method):
    """1000 seeded requests, batched: the first 3 tokens (the 2nd and 3rd verified) follow the target's law."""
    V = 4
    cfg = tiny_config(vocab_size=V, max_position_embeddings=32)
    target, draft = lively_model(cfg, 0, 0.5), lively_model(cfg, 1, 0.5)
    prompt = [1, 2, 3, 1, 2]
    from minfer.naive import naive_forward
    sd = target.state_dict()
    p = lambda seq: torch.softmax(naive_forward(sd, cfg, seq)[-1].double(), -1)  # noqa: E731
    with torch.no_grad():
        joint = torch.stack([torch.stack([p(prompt)[a] * p(prompt + [a])[b] * p(prompt + [a, b])
                                          for b in range(V)]) for a in range(V)])              # (V, V, V)
    config = {"draft": SpeculativeConfig("draft", "x", num_speculative_tokens=3),
              "prompt_lookup": SpeculativeConfig("prompt_lookup", num_speculative_tokens=3, prompt_lookup_min=1),
              "medusa": SpeculativeConfig("medusa", medusa_heads(tmp_path, cfg, 0, 2))}[method]
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=s, ignore_eos=True) for s in range(1000)]
    got, llm = engine_spec(target, [prompt] * len(params), params, config, draft, max_num_seqs=256,
                           max_num_batched_tokens=2048, enable_prefix_caching=False)
    counts = torch.zeros(V, V, V)
    for a, b, c in got:
        counts[a, b, c] += 1
    assert llm.engine.num_steps < 30                                 # batched: a handful of steps per wave
    pvalue = chi_square_pvalue(counts.flatten(), joint.flatten())
    assert pvalue > 1e-3, f"chi-square p-value {pvalue:.2e}"


# ---------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------


def test_rule_edge_cases():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    a, r = accept_reject(p, p.clone(), 1)                   # draft == target: always accept
    assert a == 1.0 and torch.equal(r, p)
    g = torch.Generator().manual_seed(0)
    assert verify_sampled(torch.stack([p] * 4), torch.stack([p] * 3), [0, 1, 2], g)[:3] == [0, 1, 2]
    q = torch.tensor([0.0, 0.0, 0.0, 1.0])                  # the draft only proposes token 3, p(3) = 0
    a, r = accept_reject(p, q, 3)
    assert a == 0.0 and torch.allclose(r, p)
    out = verify_sampled(torch.stack([p] * 3), torch.stack([q] * 2), [3, 3], g)
    assert len(out) == 1 and out[0] != 3                    # all rejected: one token, from the residual
    assert verify_greedy([4, 5, 6], [4, 5]) == [4, 5, 6]    # all accepted: the bonus token
    assert verify_greedy([4, 5, 6], [9, 5]) == [4]          # first rejected: the target's token
    assert verify_greedy([4], []) == [4]
    torch.testing.assert_close(residual_distribution(torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])),
                               torch.tensor([0.0, 1.0]))


class WrongProposer:
    """Always proposes a token the target will not pick (all rejected)."""

    def __init__(self, truth, prompt_len, vocab):
        self.truth, self.n, self.V = truth, prompt_len, vocab

    def begin(self, prompt_ids, max_len):
        pass

    def propose(self, seq, k, params, gen):
        i = len(seq) - self.n
        return [(self.truth[i] + 1) % self.V if i < len(self.truth) else 0] + [0] * (k - 1), None

    def accepted(self, seq):
        pass


class OracleProposer(WrongProposer):
    """Proposes exactly the target's greedy continuation (all accepted)."""

    def propose(self, seq, k, params, gen):
        i = len(seq) - self.n
        return (self.truth[i:i + k] + [0] * k)[:k], None


@pytest.mark.parametrize("gamma", [1, 3])
def test_all_accepted_and_all_rejected(gamma):
    model = lively_model(tiny_config(), 0, 0.3)
    prompt, params = [3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = plain(model, prompt, params)
    for proposer, rate in ((OracleProposer(want, len(prompt), 97), 1.0),
                           (WrongProposer(want, len(prompt), 97), 0.0)):
        stats = SpecStats()
        got = list(speculative_generate(model, prompt, params, proposer, num_speculative_tokens=gamma,
                                        stats=stats))
        assert got == want, first_difference(got, want)
        assert stats.acceptance_rate == rate, stats.summary()
    assert stats.mean_accepted_length == 1.0


@pytest.mark.parametrize("method", ["oracle", "draft:x,gamma=4", "prompt_lookup:k=4", "lookahead:W=3,N=3,G=3"])
def test_eos_inside_an_accepted_run(method):
    model = lively_model(tiny_config(), 0, 0.3)          # varied output: 28 72 14 19 39 48 ...
    prompt = [3, 1, 4, 1, 5]
    full = plain(model, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    eos = full[3]
    assert eos not in full[:3]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = plain(model, prompt, params, eos=[eos])
    assert want == full[:4]
    stats = SpecStats()
    if method == "oracle":                               # proposes the true continuation: all accepted
        got = list(speculative_generate(model, prompt, params, OracleProposer(full, len(prompt), 97),
                                        num_speculative_tokens=4, eos_token_ids=[eos], stats=stats))
    else:                                                # draft == target: all accepted too
        got = spec(model, prompt, params, method, draft=model, eos=[eos], stats=stats)
    assert got == want, first_difference(got, want)
    if method in ("oracle", "draft:x,gamma=4"):
        assert stats.accepted == [4], "the EOS (token 3) should arrive inside the accepted run 1..4"
    if method in ("draft:x,gamma=4", "prompt_lookup:k=4"):           # the same through the engine
        stop = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[eos])
        [got], llm = engine_spec(model, [prompt], stop, method, draft=model)
        assert got == want, first_difference(got, want)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6])
@pytest.mark.parametrize("method", ["draft:x,gamma=4", "prompt_lookup:k=5", "lookahead:W=3,N=3,G=3"])
def test_max_tokens_mid_run(max_tokens, method):
    model = lively_model(tiny_config(), 0, 0.1)
    prompt, params = [3, 1, 4, 1, 5] * 2, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    got = spec(model, prompt, params, method, draft=model)
    assert got == plain(model, prompt, params) and len(got) == max_tokens
    if "lookahead" not in method:
        assert engine_spec(model, [prompt, prompt[:7]], params, method, draft=model)[0][0] == got


@pytest.mark.parametrize("method", ["draft:x,gamma=4", "prompt_lookup:k=5", "lookahead:W=4,N=4,G=3"])
def test_context_length_limit(method):
    cfg = tiny_config(max_position_embeddings=16)
    model = lively_model(cfg, 0, 0.1)
    prompt, params = [3, 1, 4, 1, 5] * 2 + [2], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    want = plain(model, prompt, params)
    assert len(want) == 16 - len(prompt)
    assert spec(model, prompt, params, method, draft=model) == want
    with pytest.raises(ValueError, match="context"):
        spec(model, list(range(16)), params, method, draft=model)
    if "lookahead" not in method:
        assert engine_spec(model, [prompt], params, method, draft=model)[0] == [want]


def test_sampling_is_seeded_and_lookahead_is_greedy_only():
    model = lively_model(tiny_config(), 0, 0.3)
    draft = lively_model(tiny_config(), 1, 0.3)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=12, seed=7, ignore_eos=True)
    a = spec(model, [1, 2, 3], params, "draft:x,gamma=3", draft=draft)
    assert a == spec(model, [1, 2, 3], params, "draft:x,gamma=3", draft=draft) and len(a) == 12
    with pytest.raises(ValueError, match="greedy"):
        spec(model, [1, 2, 3], params, "lookahead")
    with pytest.raises(ValueError, match="roll back"):
        list(generate_speculative(model, [1, 2, 3], params, "prompt_lookup", kv_cache="sliding"))


# ---------------------------------------------------------------------------
# Prompt lookup, statistics, configuration
# ---------------------------------------------------------------------------


def test_ngram_propose():
    t = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 1, 2, 3]
    assert ngram_propose(t, 1, 3, 2) == [4, 5]              # longest suffix (1,2,3): earliest occurrence
    assert ngram_propose(t, 1, 3, 10) == [4, 5, 9, 1, 2, 3, 7, 1, 2, 3]
    assert ngram_propose([1, 2, 3, 4], 1, 3, 3) == []       # no earlier occurrence
    assert ngram_propose([5, 6, 5], 1, 1, 3) == [6, 5]      # n = 1
    assert ngram_propose([5, 6, 5], 2, 3, 3) == []          # below prompt_lookup_min: nothing
    assert ngram_propose([7, 7, 7], 1, 3, 4) == [7]         # overlapping match, 1 token follows
    assert ngram_propose([7], 1, 3, 4) == []


def test_stats_and_theory():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert math.isclose(expected_tokens_per_step(0.5, 2), 1.75)
    s = SpecStats()
    for k, n in [(4, 4), (4, 1), (4, 0), (0, 0)]:
        s.record(k, n)
    assert s.acceptance_rate == 5 / 12 and s.mean_accepted_length == 9 / 4
    assert s.per_token_acceptance == 5 / 7                  # decisions: 4 + 2 + 1 + 0
    assert s.histogram() == {0: 2, 1: 1, 4: 1}
    with pytest.raises(ValueError, match="accepted"):
        s.record(2, 3)


def test_per_token_acceptance_recovers_iid_rate():
    """Simulate i.i.d. acceptance a: the estimate recovers a and the mean length matches theory."""
    g = torch.Generator().manual_seed(0)
    for a, gamma in [(0.3, 2), (0.7, 4), (0.9, 8)]:
        s = SpecStats()
        for _ in range(4000):
            n = 0
            while n < gamma and float(torch.rand((), generator=g)) < a:
                n += 1
            s.record(gamma, n)
        assert abs(s.per_token_acceptance - a) < 0.02
        assert abs(s.mean_accepted_length - expected_tokens_per_step(a, gamma)) < 0.08


def test_config_parsing_and_errors():
    c = SpeculativeConfig.parse("prompt_lookup:k=8,min=2,max=4")
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == \
        ("prompt_lookup", 8, 2, 4)
    assert SpeculativeConfig.parse("prompt_lookup:adaptive=0").adaptive == 0
    c = SpeculativeConfig.parse("draft:layers-6,gamma=3")
    assert (c.draft_model, c.num_speculative_tokens) == ("layers-6", 3)
    c = SpeculativeConfig.parse("lookahead:W=5,N=4,G=2")
    assert (c.window, c.ngram, c.max_candidates) == (5, 4, 2)
    for bad, match in [("eagle", "one of"), ("draft", "draft model"), ("prompt_lookup:k=0", "num_speculative"),
                       ("prompt_lookup:min=3,max=2", "prompt_lookup_min"), ("lookahead:N=1", "ngram"),
                       ("lookahead:k=3", "unknown option"), ("prompt_lookup:adaptive=2", "adaptive"),
                       ("prompt_lookup:k=x", "integer"), ("", "non-empty")]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)
    model = lively_model(tiny_config(num_hidden_layers=2), 0, 0.3)
    with pytest.raises(ValueError, match="num_layers"):
        layer_skip_draft(model, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        spec(model, [1, 2], SamplingParams(temperature=0), "draft:x",
             draft=lively_model(tiny_config(vocab_size=50), 0, 0.3))


# ---------------------------------------------------------------------------
# SmolLM2 on fixed prompts
# ---------------------------------------------------------------------------

DOC = ("The Willow Creek bridge was built in 1887 by the stonemason Ada Marsh. It is 42 metres long and "
       "has three arches. The bridge was closed to cars in 1990 and is now used only by walkers and cyclists.")


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """SmolLM2, run on one thread: two threads on a busy 2-core machine can run many times slower."""
    from minfer.llm import LLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLM(str(smollm2_dir), device="cpu", dtype="float32")
    torch.set_num_threads(threads)


def smol_prompts(smol):
    """A quoting request (prompt lookup and lookahead find matches) and a free-form one."""
    tok = smol.tokenizer
    chat = lambda text, start="": tok.encode(tok.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": text}], add_generation_prompt=True) + start)
    return [chat(f"{DOC}\n\nWhen was the bridge built, and how long is it? Quote the document.",
                 'The document says: "'),
            chat("Write one sentence about the sea.")]


@pytest.fixture(scope="module")
def smol_plain(smol):
    params = SamplingParams(temperature=0, max_tokens=24)
    return [(p, plain(smol.model, p, params, eos=smol.tokenizer.eos_token_ids)) for p in smol_prompts(smol)]


@pytest.mark.model
@pytest.mark.parametrize("method", ["prompt_lookup", "draft:layers-10,gamma=3", "draft:int4,gamma=3",
                                    "lookahead:W=3,N=3,G=3"])
def test_smollm2_greedy_identical(smol, smol_plain, method):
    params = SamplingParams(temperature=0, max_tokens=24)
    config = SpeculativeConfig.parse(method)
    draft = None
    if config.method == "draft":
        from minfer.speculative import load_draft
        draft = load_draft(smol.model, config.draft_model)
    for prompt, want in smol_plain:
        stats = SpecStats()
        got = spec(smol.model, prompt, params, config, draft=draft, eos=smol.tokenizer.eos_token_ids, stats=stats)
        assert got == want, first_difference(got, want)
    if config.method == "prompt_lookup":
        assert stats.num_steps < len(got), "prompt lookup should accept guesses on the quoting prompt"


@pytest.mark.model
def test_llm_and_cli_speculative_option(smol, smollm2_dir, capsys):
    from minfer.cli import main
    from minfer.llm import LLM
    prompt = smol_prompts(smol)[0]
    params = SamplingParams(temperature=0, max_tokens=24)
    want = smol.generate(prompt, params)[0]
    fast = LLM(str(smollm2_dir), device="cpu", speculative="prompt_lookup:k=6")
    got = fast.generate(prompt, params)[0]
    assert (got.token_ids, got.text) == (want.token_ids, want.text)
    assert got.spec_stats.acceptance_rate > 0 and want.spec_stats is None
    assert main(["generate", "Say hello.", "--model", str(smollm2_dir), "--temperature", "0",
                 "--max-tokens", "6", "--speculative", "prompt_lookup"]) == 0
    assert "[speculative prompt_lookup]" in capsys.readouterr().err
    assert main(["generate", "Say hello.", "--model", str(smollm2_dir), "--speculative", "eagle"]) == 2
    assert "speculative method must be one of" in capsys.readouterr().err


def test_adaptive_prompt_lookup_shrinks_after_a_miss_and_grows_after_a_hit():
    from minfer.speculative import PromptLookupProposer
    prop = PromptLookupProposer(2, 2)
    prop.begin([], 100)
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    assert prop.propose(seq, 8, None, None)[0] == [3, 4]           # cap starts at 2
    prop.accepted(seq + [3, 4, 5])                                  # both accepted: cap 4
    seq = seq + [3, 4, 5]
    assert prop.propose(seq, 8, None, None)[0] == [6, 7, 8, 9]
    prop.accepted(seq + [6, 0])                                     # 1 accepted: cap 2
    assert prop.cap == 2
    fixed = PromptLookupProposer(2, 2, adaptive=False)
    fixed.begin([], 100)
    assert fixed.propose([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], 8, None, None)[0] == [3, 4, 5, 6, 7, 8, 9, 1]
