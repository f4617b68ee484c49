"""Fused projections (qkv_proj, gate_up_proj): the math of the separate matmuls, HF names outside.

The oracle's weights come from the *unfused* model (``fuse_projections=False``), which registers
no state-dict hooks, so no fused code takes part in building what the fused model is checked against.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny import describe_diff, tiny_config, tiny_configs

from minfer.model import build_model
from minfer.naive import naive_forward
from minfer.quant.apply import load_quantized, quantize_model, read_metadata, save_quantized


def hf_weights(cfg, seed) -> dict[str, torch.Tensor]:
    """Random weights in HF names, drawn by the plain (unfused) model."""
    return build_model(cfg, seed=seed, fuse_projections=False).state_dict()


@settings(max_examples=25, deadline=None)
@given(cfg=tiny_configs(), length=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_fused_model_equals_oracle_and_saves_hf_names(cfg, length, seed):
    sd = hf_weights(cfg, seed)
    model = build_model(cfg, sd)
    for i, layer in enumerate(model.model.layers):          # what is fused where
        attn = layer.self_attn
        assert hasattr(attn, "qkv_proj") == cfg.owns_kv(i) and hasattr(attn, "q_proj") == (not cfg.owns_kv(i))
        assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "gate_proj")
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    ours = model(torch.tensor([ids]), torch.arange(length)[None])[0]
    ref = naive_forward(sd, cfg, ids)
    assert torch.allclose(ours, ref, atol=1e-4), describe_diff(ours, ref)
    # save -> load: the same HF-named tensors, bit for bit, in the same order
    saved = model.state_dict()
    assert list(saved) == list(sd)
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in saved.items()}, str(Path(tmp) / "m.safetensors"))
        again = build_model(cfg, load_file(str(Path(tmp) / "m.safetensors"))).state_dict()
    assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


def test_seeded_random_init_is_the_same_fused_or_not():
    cfg = tiny_config(attention_bias=True, kv_share_group=2, num_hidden_layers=3)
    a, b = build_model(cfg, seed=7).state_dict(), hf_weights(cfg, 7)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", ["int8", "int4-g32", "q8_0", "q4_1"])
def test_quantized_fused_equals_quantized_per_matrix(spec, tmp_path):
    """Every output row is quantized on its own, so the stacked matrix quantizes to the per-matrix
    results stacked: the same qweight/scale/minimum/blocks, and the same file."""
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True)
    sd = hf_weights(cfg, 3)
    fused = quantize_model(build_model(cfg, sd), spec, path="reference")
    plain = quantize_model(build_model(cfg, sd, fuse_projections=False), spec, path="reference")
    a, b = fused.state_dict(), plain.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), spec
    assert fused.quantization == plain.quantization
    ids = torch.tensor([[5, 17, 3, 60, 42, 8]])
    pos = torch.arange(6)[None]
    ours, ref = fused(ids, pos), plain(ids, pos)
    assert torch.allclose(ours, ref, atol=1e-4), describe_diff(ours, ref)
    # the file speaks HF names only, and loads back into the fused model
    save_quantized(fused, tmp_path / "q.safetensors")
    names = list(load_file(str(tmp_path / "q.safetensors")))
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    assert "model.layers.0.self_attn.k_proj.bias" in names
    again = load_quantized(tmp_path / "q.safetensors", path_mode="reference")
    assert torch.equal(again(ids, pos), ours)


def test_quantized_file_with_mixed_formats_in_one_fused_linear_is_a_clear_error(tmp_path):
    cfg = tiny_config(hidden_size=64, intermediate_size=128)
    model = quantize_model(build_model(cfg, seed=0), "int8")
    model.quantization["model.layers.1.mlp.up_proj"] = "q8_0"
    save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=r"gate_proj, model.layers.1.mlp.up_proj are stacked into one "
                                         r"gate_up_proj, so they need one format"):
        load_quantized(tmp_path / "q.safetensors")
    formats = json.loads(read_metadata(tmp_path / "q.safetensors")["minfer.quantization"])
    assert formats["model.layers.0.self_attn.q_proj"] == "int8"          # HF names in the metadata too


def test_a_part_of_the_wrong_shape_is_named():
    cfg = tiny_config()
    sd = hf_weights(cfg, 0)
    sd["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(3, cfg.hidden_size)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj.weight has shape \(3, 32\): "
                                         r"it needs 16 rows"):
        build_model(cfg, sd)
