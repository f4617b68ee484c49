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
from tiny import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")     # tiny tensors: one thread is faster, and steady
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
    assert torch.allclose(teacher_bins(top.values).float(), s, atol=1e-5)
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


# ------------------------------------------------------------------------ Medusa


def _random_heads(h, K, seed, scale=0.5):
    from minfer.speculative.medusa import MedusaHeads
    heads = MedusaHeads(h, K)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads.eval()


tree_paths = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=3).map(tuple), min_size=1, max_size=12)


@SETTINGS
@given(seed=st.integers(0, 1000), paths=tree_paths, prompt_len=st.integers(1, 12), max_tokens=st.integers(1, 30),
       copy_prompt=st.booleans())
def test_medusa_decoding_is_greedy_exact(seed, paths, prompt_len, max_tokens, copy_prompt):
    """Random (untrained) heads, random trees (repeated paths, shared prefixes, missing ancestors)."""
    from minfer.speculative.medusa import medusa_generate
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    from minfer.speculative import SpecStats

    cfg = tiny_config(vocab_size=11 if copy_prompt else 97)     # a small vocab makes guesses hit often
    model = tiny_model(cfg, seed=seed)
    heads = _random_heads(cfg.hidden_size, 3, seed)
    prompt = torch.randint(cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    want = list(generate_tokens(model, prompt, params, eos_token_ids=[3]))
    stats = SpecStats()
    got = list(medusa_generate(model, heads, prompt, params, tree=paths + paths[:2], eos_token_ids=[3], stats=stats))
    assert got == want
    assert 1 + sum(a + 1 for a in stats.accepted) >= len(got)       # + 1: the prefill's token


def test_medusa_tree_mask_and_acceptance_walk():
    from minfer.speculative.medusa import accept_path, build_tree, tree_tokens
    t = build_tree([(0, 0, 0), (1,), (0, 1), (0,), (1,)])       # duplicate (1,), missing ancestor (0, 0)
    assert t.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert t.parent == [0, 0, 1, 1, 3] and t.depth == [1, 1, 2, 2, 3]
    assert t.mask[5].tolist() == [True, True, False, True, False, True]     # root, (0,), (0,0), itself
    toks = tree_tokens(t, [[10, 11], [20, 21], [30]])
    assert toks == [10, 11, 20, 21, 30]
    #  argmax at: root -> 10, (0,) -> 20, (1,) -> ?, (0,0) -> 30, (0,1) -> ?, (0,0,0) -> bonus
    assert accept_path(t, toks, [10, 20, 0, 0, 30, 0]) == [1, 3]
    assert accept_path(t, toks, [10, 20, 0, 30, 0, 0]) == [1, 3, 5]
    assert accept_path(t, toks, [99, 0, 0, 0, 0, 0]) == []
    with pytest.raises(ValueError, match="non-empty"):
        build_tree([()])


def test_medusa_head_training_step_and_save_load(tmp_path):
    from minfer.compress.medusa import head_loss, train_heads
    from minfer.speculative.medusa import MedusaHeads
    from minfer.compress.teacher import TeacherCache, build_teacher_cache

    model = tiny_model(tiny_config(), seed=1)
    ids = torch.randint(97, (16 * 4,), generator=torch.Generator().manual_seed(0)).tolist()
    build_teacher_cache(model, ids, tmp_path / "c", seq_len=16, k=8, shard_seqs=4, progress=False)
    cache = TeacherCache(tmp_path / "c")
    heads = MedusaHeads(32, 2)
    with torch.no_grad():
        loss0, _ = head_loss(model, heads, cache.batch([0, 1]))
    curve = train_heads(model, heads, cache, cache, minutes=10, steps=15, lr=1e-2, eval_every=5, log=lambda s: None)
    with torch.no_grad():
        loss1, _ = head_loss(model, heads, cache.batch([0, 1]))
    assert float(loss1) < float(loss0) and len(curve[-1]["head_top1"]) == 2
    heads.save(tmp_path / "h")
    again = MedusaHeads.load(tmp_path / "h")
    x = torch.randn(3, 32)
    assert torch.equal(again(x), heads(x))


# ------------------------------------------------------------------------ KV eviction


def _feed(model, cache, ids, chunks):
    """Feed ``ids`` in the given chunk sizes; returns the logits of every position (T, V)."""
    out, start = [], 0
    for c in chunks:
        part = ids[start:start + c]
        if not part:
            break
        x = torch.tensor([part])
        pos = torch.arange(start, start + len(part))[None]
        with torch.no_grad():
            out.append(model(x, pos, kv_cache=cache)[0])
        start += len(part)
    return torch.cat(out)


@SETTINGS
@given(seed=st.integers(0, 1000), policy=st.sampled_from(["streaming", "h2o", "snapkv"]),
       budget=st.integers(1, 24), chunks=st.lists(st.integers(1, 9), min_size=1, max_size=8),
       sinks=st.integers(0, 4), gqa=st.booleans())
def test_eviction_never_exceeds_budget_and_a_big_budget_is_the_full_cache(seed, policy, budget, chunks, sinks, gqa):
    from minfer.kv.evict import EvictingKVCache
    from minfer.kv import ContiguousKVCache

    cfg = tiny_config(num_key_value_heads=2 if gqa else 4)
    model = tiny_model(cfg, seed=seed)
    ids = torch.randint(97, (sum(chunks),), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = EvictingKVCache(model, 1, budget, policy, sinks=sinks, obs_window=3)
    start = 0
    for c in chunks:                                   # the budget holds after every forward, in every layer
        _feed(model, cache, ids[start:start + c], [c]) if start == 0 else None
        if start > 0:
            x, pos = torch.tensor([ids[start:start + c]]), torch.arange(start, start + c)[None]
            with torch.no_grad():
                model(x, pos, kv_cache=cache)
        start += c
        for layer in range(cfg.num_kv_layers):
            assert cache.num_tokens(layer) == min(budget, start)
            assert cache.pos[layer].unique().numel() == cache.num_tokens(layer)
        if policy == "streaming":                      # the sinks are never evicted
            assert set(range(min(sinks, budget, start))) <= set(cache.pos[0][0].tolist())
    big = EvictingKVCache(model, 1, sum(chunks), policy, sinks=sinks)
    full = ContiguousKVCache(cfg, 1, sum(chunks))
    torch.testing.assert_close(_feed(model, big, ids, chunks), _feed(model, full, ids, chunks), atol=1e-5, rtol=1e-5)


def test_h2o_keeps_the_token_that_gets_the_most_attention():
    """Hand-made queries: position 2 receives almost all attention, so H2O keeps it over older/newer ones."""
    from minfer.attention import sdpa_attention
    from minfer.kv.evict import EvictingKVCache

    cfg = tiny_config(num_hidden_layers=1)
    model = tiny_model(cfg, seed=0)
    cache = EvictingKVCache(model, 1, budget=3, policy="h2o", recent=1)
    hd, nkv, nh = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    k = torch.zeros(1, nkv, 6, hd)
    k[:, :, 2, 0] = 50.0                                           # key 2 aligned with every query
    v = torch.randn(1, nkv, 6, hd)
    q = torch.zeros(1, nh, 6, hd)
    q[..., 0] = 1.0                                                # query channel 0 of every head (rotated)
    pos = torch.arange(6)[None]
    view = cache.update(0, k, v, pos)
    assert view.keys.shape[2] == 6                                 # this forward still sees every key
    out = cache.attend(0, q, view, pos, sdpa_attention)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, pos, pos))   # attention itself is untouched
    kept = cache.pos[0][0].tolist()
    assert 2 in kept and 5 in kept and len(kept) == 3            # heavy hitter + the most recent
    with pytest.raises(ValueError, match="policy"):
        EvictingKVCache(model, 1, 3, "lru")


@pytest.mark.parametrize("gqa", [False, True])
def test_h2o_scores_are_the_attention_the_backend_computed(gqa):
    """H2O's scores after a prefill = the attention weights of the queries and keys the backend was
    handed (rotated once, by the model), summed over heads and queries."""
    from minfer.attention import reference_attention
    from minfer.kv.evict import EvictingKVCache

    cfg = tiny_config(num_hidden_layers=1, num_key_value_heads=2 if gqa else 4)
    model = tiny_model(cfg, seed=1)
    seen = []

    def recording(q, k, v, q_pos, k_pos, window=None, scale=None):
        seen.append((q, k, q_pos, k_pos))
        return reference_attention(q, k, v, q_pos, k_pos, window, scale)

    cache = EvictingKVCache(model, 1, budget=64, policy="h2o")
    with torch.no_grad():
        model(torch.randint(97, (1, 10), generator=torch.Generator().manual_seed(1)), torch.arange(10)[None],
              kv_cache=cache, attention=recording)
    q, k, q_pos, k_pos = seen[0]                                           # (1, nh, 10, hd), (1, nkv, 10, hd)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)              # (1, nh, 10, hd)
    logits = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = k_pos[:, None, None, :] <= q_pos[:, None, :, None]           # (1, 1, 10, 10)
    weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(cache.score[0].double(), weights.sum(dim=(1, 2)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ structured pruning


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids))


@SETTINGS
@given(seed=st.integers(0, 1000), ratio=st.sampled_from([0.0, 0.25, 0.5, 0.9]), drop=st.integers(0, 1),
       nkv=st.sampled_from([1, 2]))
def test_pruning_keeps_the_math_of_the_kept_channels(seed, ratio, drop, nkv):
    """Ratio 0 is the original; un-pruning (zeros at removed channels) gives the pruned model's output."""
    from minfer.compress.prune import importance, choose, prune_model, prune_state, unprune_state
    from minfer.model import build_model

    cfg = tiny_config(num_key_value_heads=nkv)
    model = tiny_model(cfg, seed=seed)
    ids = torch.randint(97, (2, 10), generator=torch.Generator().manual_seed(seed))
    pruned, (fk, hk) = prune_model(model, ids, ratio, drop)
    assert pruned.cfg.intermediate_size == 48 - round(ratio * 48)
    assert pruned.cfg.num_attention_heads == 4 - drop * nkv
    if ratio == 0 and drop == 0:
        torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), atol=0, rtol=0)
    full = build_model(cfg, unprune_state(pruned.state_dict(), cfg, fk, hk))
    torch.testing.assert_close(_logits(full, ids), _logits(pruned, ids), atol=1e-5, rtol=1e-5)
    # the zeroed channels are exactly the removed ones: masking the original gives the same model
    masked = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    for i, f in enumerate(fk):
        gone = torch.ones(48, dtype=torch.bool)
        gone[f] = False
        masked[f"model.layers.{i}.mlp.down_proj.weight"][:, gone] = 0
        heads_gone = torch.ones(4, dtype=torch.bool)
        heads_gone[hk[i]] = False
        masked[f"model.layers.{i}.self_attn.o_proj.weight"].view(32, 4, 8)[:, heads_gone] = 0
    torch.testing.assert_close(_logits(build_model(cfg, masked), ids), _logits(pruned, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ffn_ratio"):
        choose(*importance(model, ids), cfg, 1.0)
    assert prune_state(model, fk, hk)[0].num_parameters() == sum(p.numel() for p in pruned.parameters())


def test_pruning_removes_the_least_important_channel():
    from minfer.compress.prune import prune_model
    cfg = tiny_config(num_hidden_layers=1)
    model = tiny_model(cfg, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0           # channel 7 adds nothing
    _, (fk, _) = prune_model(model, torch.randint(97, (1, 8)), 1 / 48)
    assert 7 not in fk[0].tolist() and len(fk[0]) == 47


def test_speculative_medusa_spec_string_loads_heads_and_matches_plain(tmp_path):
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    from minfer.speculative import SpeculativeConfig, generate_speculative

    cfg = tiny_config(vocab_size=13)
    model = tiny_model(cfg, seed=3)
    _random_heads(cfg.hidden_size, 3, 3).save(tmp_path / "heads")
    params = SamplingParams(temperature=0, max_tokens=25)
    prompt = [1, 2, 3, 4, 1, 2]
    for spec in (f"medusa:{tmp_path / 'heads'}", f"medusa:{tmp_path / 'heads'},nodes=3",
                 f"medusa:{tmp_path / 'heads'},nodes=6,depth=1"):
        assert list(generate_speculative(model, prompt, params, spec)) == list(generate_tokens(model, prompt, params))
    assert SpeculativeConfig.parse("medusa:x,nodes=3").medusa_nodes == 3
    assert SpeculativeConfig.parse("medusa:x,nodes=6,depth=1").medusa_depth == 1
    with pytest.raises(ValueError, match="medusa_depth"):
        SpeculativeConfig.parse("medusa:x,depth=0")
    with pytest.raises(ValueError, match="heads folder"):
        SpeculativeConfig.parse("medusa")
    with pytest.raises(ValueError, match="greedy"):
        list(generate_speculative(model, prompt, SamplingParams(temperature=1.0), f"medusa:{tmp_path / 'heads'}"))


# ------------------------------------------------------------------------ lesson 10 exercises
# (the engine passes them in tests/test_grader.py)

def test_h2o_cache_keeps_what_h2o_keep_says():
    """The cache's tensor selection equals the plain-list rule of the exercise."""
    from minfer.kv.evict import EvictingKVCache, h2o_keep
    cfg = tiny_config(num_hidden_layers=1)
    cache = EvictingKVCache(tiny_model(cfg), 1, budget=5, policy="h2o", recent=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        S = 9
        scores = torch.randperm(S, generator=g).float()[None]
        pos = torch.arange(S)[None]
        k = torch.randn(1, 2, S, 8)
        cache._keep(0, k, k, pos, scores)
        assert cache.pos[0][0].tolist() == h2o_keep(scores[0].tolist(), 5, 2)


def test_cli_commands_reject_bad_input_with_one_line(capsys):
    from minfer.cli import main
    assert main(["distill"]) == 2
    assert "give --minutes or --steps" in capsys.readouterr().err
    assert main(["bench", "evict", "--policies", "lru"]) == 2
    assert "--policies: unknown ['lru']" in capsys.readouterr().err
    assert main(["distill", "--minutes", "1", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["medusa", "selfdistill"]) == 2
    assert "give --minutes, or --minutes-generate and --minutes-train" in capsys.readouterr().err
    assert main(["medusa", "selfdistill", "--minutes-generate", "1", "--minutes-train", "-1"]) == 2
    assert "the minutes must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(6))
def test_medusa_full_tree_over_a_tiny_vocab_accepts_every_level_and_stays_exact(seed):
    """Vocab 3 and a tree holding every 3-token continuation: each step must accept 3 tokens, so the
    K/V of all accepted nodes must be committed correctly for the output to stay greedy."""
    import itertools
    from minfer.speculative.medusa import medusa_generate
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    from minfer.speculative import SpecStats

    cfg = tiny_config(vocab_size=3)
    model = tiny_model(cfg, seed=seed)
    with torch.no_grad():                 # large projections: the output depends on every cached token
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(30)
    tree = [p for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)]
    params = SamplingParams(temperature=0, max_tokens=30)
    stats = SpecStats()
    got = list(medusa_generate(model, _random_heads(cfg.hidden_size, 3, seed), [0, 1, 2, 1], params,
                               tree=tree, stats=stats))
    assert got == list(generate_tokens(model, [0, 1, 2, 1], params))
    assert stats.accepted[:-1] == [3] * (len(stats.accepted) - 1)


# ------------------------------------------------------------------------ Medusa self-distillation


def test_selfdistill_caches_the_models_own_answers_and_trains_only_on_them(tmp_path):
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    from minfer.compress.medusa import head_loss, train_heads
    from minfer.speculative.medusa import MedusaHeads
    from minfer.compress.selfdistill import build_prompts, rows_and_mask, selfdistill
    from minfer.compress.teacher import TeacherCache
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams

    cfg = tiny_config(vocab_size=260, max_position_embeddings=2048)
    llm = LLM(str(save_hf_folder(tmp_path / "m", cfg, tiny_model(cfg, seed=3).state_dict(), *tiny_tokenizer())))
    caches = selfdistill(llm, tmp_path / "data", minutes_generate=5, max_examples=3, heldout_examples=2,
                         max_tokens=6, batch=2, seq_len=1024, k=8, progress=False, max_files=20)
    train = TeacherCache(caches["train"])
    assert len(train) == 3 and len(TeacherCache(caches["heldout"])) == 2
    # every cached row is a training-split prompt followed by the model's own greedy answer, masked in
    import json
    ex = json.loads((tmp_path / "data" / "examples_train.json").read_text())["examples"]
    assert all(e["split"] == "train" for e in ex)
    b = train.batch([0, 1, 2])
    for i, e in enumerate(ex):
        p, a = e["prompt_ids"], e["answer_ids"]
        again = llm.generate([p], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids
        assert a == list(again) and 1 <= len(a) <= 6
        assert b.tokens[i, :len(p) + len(a)].tolist() == p + a
        assert b.loss_mask[i].nonzero().squeeze(1).tolist() == list(range(len(p), len(p) + len(a)))
    # prompt / padding positions never reach the loss: poisoning their hidden states changes nothing
    heads = MedusaHeads(cfg.hidden_size, 2)
    torch.nn.init.normal_(heads.blocks[0].weight, std=0.3)
    with torch.no_grad():
        loss, accs = head_loss(llm.model, heads, b)
        b.hidden[~b.loss_mask.roll(-1, dims=1)] = 1e3          # t whose next token is not generated
        assert torch.equal(head_loss(llm.model, heads, b)[0], loss)
    curve = train_heads(llm.model, heads, train, TeacherCache(caches["heldout"]), minutes=10, steps=3,
                        log=lambda s: None)
    assert len(curve[-1]["head_top1"]) == 2
    # a too-long example is dropped, not cut
    ids, mask, dropped = rows_and_mask([{"prompt_ids": [1] * 5, "answer_ids": [2] * 4}], 8, 0)
    assert (ids, mask, dropped) == ([], [], 1)
    assert build_prompts(llm.tokenizer, "train", 0) == []


def test_medusa_verify_cost_times_every_step_kind():
    from minfer.bench.medusa_cost import verify_costs
    model = tiny_model(tiny_config(), seed=2)
    costs = verify_costs(model, _random_heads(32, 3, 0), list(range(1, 20)), sizes=(1, 4, 7), repeats=2)
    assert set(costs) == {"plain", "T=1", "T=4", "T=7"} and all(v > 0 for v in costs.values())
    with pytest.raises(ValueError, match="sizes must lie in"):
        verify_costs(model, _random_heads(32, 3, 0), [1, 2], sizes=(40,))
