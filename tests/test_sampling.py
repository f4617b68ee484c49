"""Sampling properties (hypothesis) and parameter validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minfer.sampling import SamplingParams, make_generator, sample, sample_rows, top_k_filter, top_p_filter

logit_vectors = st.integers(2, 40).flatmap(lambda V: st.lists(
    st.floats(-20, 20, allow_nan=False, width=32), min_size=V, max_size=V)).map(torch.tensor)


@settings(max_examples=100, deadline=None)
@given(logits=logit_vectors, k=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_top_k_never_returns_a_token_outside_the_top_k(logits, k, seed):
    tok = sample(logits, SamplingParams(temperature=1.0, top_k=k, seed=seed))
    kth = torch.sort(logits, descending=True).values[min(k, len(logits)) - 1]
    assert logits[tok] >= kth


@settings(max_examples=100, deadline=None)
@given(logits=logit_vectors, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    kept = ~torch.isinf(top_p_filter(logits, p))
    probs = torch.softmax(logits.double(), -1)
    order = torch.argsort(logits, descending=True, stable=True)
    n = int(kept.sum())
    if n < len(logits):
        assert logits[kept].min() >= logits[~kept].max(), "kept tokens must be the most likely ones"
    mass = probs[order[:n]].sum().item()
    assert mass >= p - 1e-5, f"kept mass {mass} < p {p}"
    assert n == 1 or probs[order[:n - 1]].sum().item() < p + 1e-5, "one token fewer would already reach p"


@settings(max_examples=50, deadline=None)
@given(logits=logit_vectors, k=st.integers(1, 50), p=st.floats(0.05, 1.0))
def test_temperature_zero_is_argmax(logits, k, p):
    assert sample(logits, SamplingParams(temperature=0, top_k=k, top_p=p)) == int(torch.argmax(logits))


@settings(max_examples=50, deadline=None)
@given(logits=logit_vectors, seed=st.integers(0, 2**32 - 1), t=st.floats(0.1, 2.0))
def test_same_seed_same_tokens(logits, seed, t):
    params = SamplingParams(temperature=t, seed=seed)
    g1, g2 = make_generator(seed), make_generator(seed)
    a = [sample(logits, params, g1) for _ in range(5)]
    b = [sample(logits, params, g2) for _ in range(5)]
    assert a == b


def test_sampler_follows_the_distribution():
    """The exponential race draws from softmax(logits): frequencies over 20k draws."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    g = make_generator(0)
    params = SamplingParams(temperature=1.0)
    counts = torch.bincount(torch.tensor([sample(logits, params, g) for _ in range(20000)]), minlength=4)
    assert torch.allclose(counts / 20000, torch.softmax(logits, -1), atol=0.015)


def test_top_k_filter_keeps_k():
    x = torch.tensor([1.0, 5.0, 3.0, 4.0])
    assert torch.isinf(top_k_filter(x, 2)).tolist() == [True, False, True, False]


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -1), ("max_tokens", 0), ("n", 0)])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(st.booleans(), st.integers(0, 2**31 - 1)), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_sample_rows_equals_sample_row_by_row(rows, seed, ties):
    """The batch sampler (greedy rows in one argmax) picks what ``sample`` picks for each row alone."""
    logits = torch.randn(len(rows), 40, generator=torch.Generator().manual_seed(seed))
    if ties:                                   # exact ties: both must take the first maximum
        logits = logits.round()
    params = [SamplingParams(temperature=0 if greedy else 0.8, seed=s) for greedy, s in rows]
    got = sample_rows(logits, params, [make_generator(p.seed) for p in params])
    want = [sample(logits[i], p, make_generator(p.seed)) for i, p in enumerate(params)]
    assert got.tolist() == want


def _sample_one_row(logits, p, gen):
    """The sampler written plainly for one row (the pipeline of the module docstring): the reference."""
    if p.greedy:
        return int(torch.argmax(logits))
    x = top_p_filter(top_k_filter(logits.float() / p.temperature, p.top_k), p.top_p)
    probs = torch.softmax(x, dim=-1)
    return int(torch.argmax(probs / torch.empty_like(probs).exponential_(1.0, generator=gen)))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from([0.0, 0.3, 1.0, 1.7]), st.sampled_from([0, 1, 3, 40, 100]),
                               st.sampled_from([1.0, 0.5, 0.9, 0.01]), st.integers(0, 2**31 - 1)),
                     min_size=1, max_size=7),
       seed=st.integers(0, 2**31 - 1))
def test_batched_sampler_equals_the_plain_one_row_sampler(rows, seed):
    """Mixed temperatures, top-k and top-p in one batch: each row's token is the plain sampler's."""
    logits = torch.randn(len(rows), 40, generator=torch.Generator().manual_seed(seed)) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s) for t, k, p, s in rows]
    got = sample_rows(logits, params, [make_generator(p.seed) for p in params])
    assert got.dtype == torch.long and got.shape == (len(rows),)
    assert got.tolist() == [_sample_one_row(logits[i], p, make_generator(p.seed)) for i, p in enumerate(params)]
