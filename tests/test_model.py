"""The transformer against HF transformers (the external oracle) and against naive.py."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import describe_diff, tiny_config, tiny_configs, tiny_model

from minfer.config import ModelConfig
from minfer.model import apply_rope, rope_cos_sin, rope_inv_freq
from minfer.naive import naive_forward

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_logits(cfg: ModelConfig, state_dict, ids: torch.Tensor) -> torch.Tensor:
    from minfer.bench.peers import hf_model
    with torch.no_grad():
        return hf_model(cfg, state_dict, attn_implementation="eager")(ids).logits


@pytest.mark.parametrize("nkv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_equal_transformers(nkv, tied, family):
    cfg = tiny_config(num_key_value_heads=nkv, tie_word_embeddings=tied, model_type=family,
                      attention_bias=family == "qwen2", num_hidden_layers=3)
    model = tiny_model(cfg, seed=nkv)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    ours = model(ids, torch.arange(33).expand(2, 33))
    ref = hf_logits(cfg, model.state_dict(), ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), describe_diff(ours, ref)


def test_llama3_rope_scaling_equals_transformers():
    cfg = tiny_config(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)
    model = tiny_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    ours = model(ids, torch.arange(64)[None])
    ref = hf_logits(cfg, model.state_dict(), ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), describe_diff(ours, ref)


@settings(max_examples=20, deadline=None)
@given(cfg=tiny_configs(), length=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_naive_oracle_equals_full_forward(cfg, length, seed):
    model = tiny_model(cfg, seed=seed % 97)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    ours = model(ids, torch.arange(length)[None], attention="reference")[0]
    ref = naive_forward(model.state_dict(), cfg, ids[0].tolist())
    assert torch.allclose(ours, ref, atol=1e-4), describe_diff(ours, ref)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(-500, 2000),
       seed=st.integers(0, 2**16), scaled=st.booleans())
def test_rope_scores_depend_only_on_offset(m, n, shift, seed, scaled):
    """RoPE's defining property: <R(m) q, R(n) k> = <R(m + s) q, R(n + s) k>."""
    cfg = tiny_config(head_dim=16, rope_scaling=LLAMA3_SCALING if scaled else None)
    inv = rope_inv_freq(cfg)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(a, b):
        cos_a, sin_a = rope_cos_sin(inv.double(), torch.tensor([[a]], dtype=torch.float64))
        cos_b, sin_b = rope_cos_sin(inv.double(), torch.tensor([[b]], dtype=torch.float64))
        return (apply_rope(q, cos_a, sin_a) * apply_rope(k, cos_b, sin_b)).sum().item()

    s2 = max(shift, -min(m, n))
    assert math.isclose(score(m, n), score(m + s2, n + s2), rel_tol=1e-6, abs_tol=1e-6)


def test_config_round_trips_through_hf_dict():
    cfg = tiny_config(rope_scaling=LLAMA3_SCALING, attention_bias=True, tie_word_embeddings=False)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("field,value", [("num_key_value_heads", 3), ("hidden_size", 0), ("head_dim", 7),
                                         ("sliding_window", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


# ------------------------------------------------------------ Gemma 3 features


def test_gemma_logits_equal_transformers():
    """Every Gemma 3 switch at once against HF Gemma3ForCausalLM (eager attention), over a
    sequence longer than the window so local and global layers differ."""
    from tiny import tiny_gemma_config
    cfg = tiny_gemma_config(num_hidden_layers=6, query_pre_attn_scalar=20)
    model = tiny_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(4))
    ours = model(ids, torch.arange(19).expand(2, 19))
    ref = hf_logits(cfg, model.state_dict(), ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), describe_diff(ours, ref)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), length=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_gemma_naive_oracle_equals_full_forward(data, length, seed):
    from tiny import tiny_gemma_configs
    cfg = data.draw(tiny_gemma_configs())
    model = tiny_model(cfg, seed=seed % 97)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    for backend in ("reference", "sdpa"):
        ours = model(ids, torch.arange(length)[None], attention=backend)[0]
        ref = naive_forward(model.state_dict(), cfg, ids[0].tolist())
        assert torch.allclose(ours, ref, atol=1e-4), f"{backend}: {describe_diff(ours, ref)}"


def test_gemma_config_round_trips_through_hf_dict():
    from tiny import tiny_gemma_config
    cfg = tiny_gemma_config()
    d = cfg.to_hf()
    assert d["architectures"] == ["Gemma3ForCausalLM"] and d["hidden_activation"] == "gelu_pytorch_tanh"
    assert d["rope_parameters"]["sliding_attention"]["rope_theta"] == 1000.0
    assert ModelConfig.from_hf(d) == cfg
    assert [cfg.window_of(i) for i in range(4)] == [4, 4, None, 4] and cfg.is_hybrid
    assert [cfg.rope_theta_of(i) for i in range(4)] == [1000.0, 1000.0, 100000.0, 1000.0]


@pytest.mark.parametrize("field,value", [("layer_types", ["full_attention"]), ("hidden_act", "relu"),
                                         ("norm_offset", 0.5), ("embed_scale", 0.0)])
def test_bad_gemma_field_names_it(field, value):
    from tiny import tiny_gemma_config
    with pytest.raises(ValueError, match=field):
        tiny_gemma_config(**{field: value})
