"""Compression: distillation loss, teacher cache, student training, Medusa, pruning, KV eviction.

Tiny random models only; no training beyond a few steps (seconds).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minfer.compress.losses import binned_kl, distill_loss, student_bins, teacher_bins
from tests.tiny import tiny_config, tiny_model

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------ distillation loss


def reference_distill(logits, t_idx, t_logp, targets, T, alpha):
    """Float64, one position at a time, straight from the definition in losses.py."""
    total_kl, total_ce = 0.0, 0.0
    N, V = logits.shape
    for n in range(N):
        z = logits[n].double()
        s = torch.exp(z - torch.logsumexp(z, 0))                        # student probs (V,)
        idx = t_idx[n].tolist()
        p_top = t_logp[n].double().exp()
        p_rest = max(1.0 - float(p_top.sum()), 1e-6)
        t_bins = list(p_top.tolist()) + [p_rest]
        s_top = [float(s[i]) for i in idx]
        s_bins = s_top + [float(s.sum()) - sum(s_top)]
        tw = [b ** (1 / T) for b in t_bins]
        sw = [b ** (1 / T) for b in s_bins]
        qt = [w / sum(tw) for w in tw]
        qs = [w / sum(sw) for w in sw]
        total_kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(qt, qs) if a > 0)
        total_ce += -math.log(float(s[targets[n]]))
    return alpha * T * T * total_kl / N + (1 - alpha) * total_ce / N


@SETTINGS
@given(seed=st.integers(0, 10_000), N=st.integers(1, 6), V=st.integers(4, 40), k=st.integers(1, 8),
       T=st.sampled_from([0.5, 1.0, 2.0, 4.0]), alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       scale=st.sampled_from([0.1, 3.0, 10.0]))
def test_distill_loss_equals_float64_reference(seed, N, V, k, T, alpha, scale):
    k = min(k, V - 1)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * scale
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * scale, -1)
    top = teacher.topk(k, -1)
    targets = torch.randint(V, (N,), generator=g)
    got = distill_loss(logits, top.indices, top.values.float(), targets, temperature=T, alpha=alpha)
    want = reference_distill(logits, top.indices, top.values.float(), targets, T, alpha)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_binned_kl_is_zero_for_the_teacher_itself_and_bins_sum_to_one():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 30, generator=g)
    top = torch.log_softmax(z, -1).topk(6, -1)
    s = student_bins(z, top.indices)
    assert torch.allclose(s.exp().sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(teacher_bins(top.values), s, atol=1e-5)
    assert float(binned_kl(teacher_bins(top.values), s, 3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        binned_kl(s, s, 0.0)


# ------------------------------------------------------------------------ teacher cache


def _cache_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def test_teacher_cache_resumed_after_a_kill_equals_an_uninterrupted_one(tmp_path):
    from minfer.compress.teacher import TeacherCache, build_teacher_cache

    model = tiny_model(tiny_config(), seed=1)
    ids = torch.randint(97, (16 * 6 + 5,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(seq_len=16, k=5, shard_seqs=2, batch=1, progress=False)
    build_teacher_cache(model, ids, tmp_path / "full", **kw)
    build_teacher_cache(model, ids, tmp_path / "killed", stop_after_shards=1, **kw)   # "killed" after one shard
    (tmp_path / "killed" / ".shard_00001.x1y2.tmp").mkdir()                         # debris of a dead write
    assert len(TeacherCache(tmp_path / "killed")) == 2
    build_teacher_cache(model, ids, tmp_path / "killed", **kw)                         # resume
    assert _cache_files(tmp_path / "full") == _cache_files(tmp_path / "killed")
    c = TeacherCache(tmp_path / "full")
    assert len(c) == 6 and c.num_tokens == 96
    b = c.batch([5, 0])
    assert b.tokens.shape == (2, 16) and b.topk_idx.shape == (2, 16, 5) and b.hidden.shape == (2, 16, 32)
    assert b.tokens[0].tolist() == ids[80:96]
    with torch.no_grad():
        logits = model(b.tokens, torch.arange(16)[None].expand(2, 16))
    assert torch.equal(logits.argmax(-1), b.topk_idx[..., 0])
    with pytest.raises(ValueError, match="other settings"):
        build_teacher_cache(model, ids, tmp_path / "full", **{**kw, "k": 4})


def test_a_few_distillation_steps_lower_the_loss_and_save_a_loadable_draft(tmp_path):
    from minfer.compress.distill import evaluate, train
    from minfer.compress.teacher import TeacherCache, build_teacher_cache

    teacher = tiny_model(tiny_config(), seed=1)
    teacher.model.embed_tokens.weight.mul_(40)          # a confident teacher: far from uniform
    ids = torch.randint(97, (16 * 8,), generator=torch.Generator().manual_seed(0)).tolist()
    build_teacher_cache(teacher, ids, tmp_path / "c", seq_len=16, k=8, shard_seqs=4, progress=False)
    cache = TeacherCache(tmp_path / "c")
    student = tiny_model(tiny_config(num_hidden_layers=1, intermediate_size=16), seed=2)
    before = evaluate(student, cache)
    curve = train(student, cache, cache, steps=30, batch=4, lr=1e-2, eval_every=10, log=lambda s: None)
    assert [r["step"] for r in curve] == [0, 10, 20, 30]
    assert curve[-1]["heldout_kl"] < before["heldout_kl"]
    assert not any(p.requires_grad for p in student.parameters())
