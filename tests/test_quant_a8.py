"""Int8 activations (W8A8, W4A8): the C++ kernel equals its plain reference, and the reference
is within the error of rounding the activations to int8 blocks of 32.

The oracle: ``linear_a8_reference`` = round x to int8 per block of 32 (scale = block max / 127),
then a float linear on the dequantized weight. Its distance to the float linear is at most half
a step per activation: |y - x W^T| <= sum_k (dx[block of k] / 2) |W[n, k]|. The kernel computes
the same sums with integer dot products, so it differs from the reference only by the order of
float additions.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_config, tiny_model

from minfer.kernels import cpu_quant_linear as a8
from minfer.quant.apply import QuantSpec, load_quantized, parse_spec, quantize_model, quantize_weight, save_quantized

FORMATS = ["int8", "int4-g32", "int4-g64", "int4-g128", "q8_0", "q4_0", "q4_1"]
needs_kernel = pytest.mark.skipif(a8.why_unavailable() is not None,
                                  reason=f"int8-activation kernel: {a8.why_unavailable()}")


def _inputs(seed: int, m: int, k: int, n: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * scale
    x[0, : min(k, 40)] = 0.0                               # a zero block (scale 0)
    if m > 1:
        x[1, 3] = 50.0 * scale                             # an outlier that owns its block's scale
    return x, torch.randn(n, k, generator=gen) * 0.05


def _block_steps(x: torch.Tensor) -> torch.Tensor:
    """Half the activation step of each element: (block max / 127) / 2, shape of x."""
    k = x.shape[1]
    xp = torch.nn.functional.pad(x, (0, -k % 32)).reshape(len(x), -1, 32)
    return (xp.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(xp).reshape(len(x), -1)[:, :k]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 5), blocks=st.integers(1, 6), n=st.integers(1, 40),
       fmt=st.sampled_from(FORMATS), extra=st.sampled_from([0, 0, 7]), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_reference_is_within_half_an_activation_step(seed, m, blocks, n, fmt, extra, scale):
    k = 32 * blocks + (extra if fmt.startswith("int") else 0)
    x, w = _inputs(seed, m, k, n, scale)
    lin = quantize_weight(w, fmt + "-a8")
    wd = lin.dequantize()
    y = a8.linear_a8_reference(x, wd)
    bound = _block_steps(x) @ wd.abs().t()                              # (M, N)
    exact = x.double() @ wd.double().t()
    assert ((y.double() - exact).abs() <= bound.double() * (1 + 1e-4) + 1e-5 * exact.abs().max()).all()


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 5), blocks=st.integers(1, 8), n=st.integers(1, 40),
       fmt=st.sampled_from(FORMATS), extra=st.sampled_from([0, 0, 5]), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       threads=st.sampled_from([1, 2]))
def test_kernel_equals_reference(seed, m, blocks, n, fmt, extra, scale, threads):
    k = 32 * blocks + (extra if fmt.startswith("int") else 0)
    x, w = _inputs(seed, m, k, n, scale)
    lin = quantize_weight(w, fmt + "-a8")
    assert lin.uses_fast_path("cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = lin(x)
    finally:
        torch.set_num_threads(old)
    wd = lin.dequantize()
    ref = a8.linear_a8_reference(x, wd)
    # the same products summed in another order: float32 rounding of the sum of |terms|
    tol = 1e-5 * (a8.fake_quantize_rows(x).abs() @ wd.abs().t()) + 1e-30
    assert ((y - ref).abs() <= tol).all(), (y - ref).abs().max()


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 4), blocks=st.integers(1, 8),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_kernel_quantizes_activations_like_the_reference(seed, m, blocks, scale):
    x, _ = _inputs(seed, m, 32 * blocks, 1, scale)
    x[-1, -32:] = torch.tensor([127.0, -63.5, 0.5, -1.5] * 8) * scale       # few values, some on half steps
    got = a8._state["module"].quantize_rows(x)
    want = a8.quantize_rows_reference(x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_no_kernel_runs_the_reference_and_says_why(monkeypatch):
    """A CPU without AVX2 (or without a compiler): same numbers by the plain path, one warning."""
    from minfer.quant import linear
    x, w = _inputs(0, 3, 96, 20, 1.0)
    lin = quantize_weight(w, "q4_1-a8")
    monkeypatch.setitem(a8._state, "why", "this CPU lacks AVX2 (and AVX-512 VNNI)")
    monkeypatch.setattr(linear, "_A8_WARNED", set())
    assert not lin.uses_fast_path("cpu")
    with pytest.warns(UserWarning, match="more slowly: this CPU lacks AVX2"):
        y = lin(x)
    assert torch.allclose(y, a8.linear_a8_reference(x, lin.dequantize()), rtol=0, atol=0)
    lin.path = "fast"
    with pytest.raises(RuntimeError, match="no int8-activation kernel here: this CPU lacks"):
        lin(x)
    lin.path = "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin(x)                                              # asked for: no warning


def test_spec_names_and_errors():
    assert parse_spec("int8-a8") == QuantSpec("int8", None, act8=True)
    assert parse_spec("w8a8").name == "int8-a8" and parse_spec("W4A8").name == "int4-g32-a8"
    assert parse_spec("q4_1-a8").name == "q4_1-a8" and parse_spec("int4-g64-a8").group_size == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        parse_spec("int4-g48-a8")
    with pytest.raises(ValueError, match="unknown quantization"):
        parse_spec("int3-a8")


def test_model_quantizes_saves_and_loads_with_int8_activations(tmp_path):
    """The head follows the body's activations; the formats survive a save / load; the logits stay
    within the error int8 activations add (the checkpoint holds the weight-only tensors)."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    pos = torch.arange(12)[None]
    quantize_model(model, "int4-a8", path="reference")
    assert model.quantization["lm_head"] == "int8-a8"
    assert {v for k, v in model.quantization.items() if k != "lm_head"} == {"int4-g32-a8"}
    want = model(ids, pos)
    back = load_quantized(save_quantized(model, tmp_path / "m.safetensors"), path_mode="reference")
    assert back.quantization == model.quantization
    assert torch.equal(back(ids, pos), want)
    if a8.why_unavailable() is None:                       # the kernel gives the reference's logits
        for mod in back.modules():
            if hasattr(mod, "act8"):
                mod.path = "auto"
        assert torch.allclose(back(ids, pos), want, atol=1e-4, rtol=1e-4)


def test_engine_runs_with_int8_activations(tmp_path):
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams
    cfg = tiny_config(vocab_size=260)
    folder = save_hf_folder(tmp_path / "m", cfg, tiny_model(cfg).state_dict(), *tiny_tokenizer())
    llm = LLM(str(folder), quantization="w8a8")
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6
    assert all(m.act8 for m in llm.model.modules() if hasattr(m, "act8")) and llm.model.quantization
