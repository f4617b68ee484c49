"""oneDNN prepacked linears (minfer/kernels/onednn_linear.py) against F.linear and the naive oracle."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

from minfer.kernels.onednn_linear import PackedLinear, available, pack_linears, why_not_packable
from minfer.naive import naive_generate
from minfer.sampling import SamplingParams
from tiny import describe_diff, tiny_config, tiny_configs, tiny_model

pytestmark = [pytest.mark.skipif(not available(), reason="this torch build has no oneDNN"),
              pytest.mark.usefixtures("one_thread")]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), lead=st.sampled_from([(), (1,), (2,)]), n_in=st.integers(1, 96),
       n_out=st.integers(1, 96), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_linear_equals_f_linear(rows, lead, n_in, n_out, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=gen)
    b = torch.randn(n_out, generator=gen) if bias else None
    x = torch.randn(*lead, rows, n_in, generator=gen)
    with torch.no_grad():
        got, want = PackedLinear(w, b)(x), F.linear(x, w, b)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), describe_diff(got, want)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 64), lead=st.sampled_from([(), (1,), (2,)]), n_in=st.integers(1, 160),
       n_out=st.integers(1, 160), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_linear_in_bf16_is_f_linear(rows, lead, n_in, n_out, bias, seed):
    """In bf16 torch's F.linear is oneDNN too: with bf16 units the packed result is F.linear's bit for
    bit; without them (oneDNN or torch emulate the products) within one bf16 rounding of it."""
    from minfer.devices import cpu_bf16_units
    if why := why_not_packable(torch.bfloat16):
        pytest.skip(why)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=gen).bfloat16()
    b = torch.randn(n_out, generator=gen).bfloat16() if bias else None
    x = torch.randn(*lead, rows, n_in, generator=gen).bfloat16()
    with torch.no_grad():
        got, want = PackedLinear(w, b)(x), F.linear(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    if cpu_bf16_units():
        assert torch.equal(got, want), describe_diff(got.float(), want.float())
    else:
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=2**-7 * n_in ** 0.5)


@settings(max_examples=12, deadline=None)
@given(cfg=tiny_configs(), prompt=st.lists(st.integers(0, 96), min_size=1, max_size=12), seed=st.integers(0, 99))
def test_packed_model_gives_the_oracles_greedy_tokens(cfg, prompt, seed):
    """Every linear (and a tied LM head) packed: logits within 1e-4 of the unpacked model's, and the
    engine's greedy tokens equal the naive oracle's (GQA/MQA, bias, tied or not, window, KV sharing)."""
    from minfer.llm import LLM
    plain = tiny_model(cfg, seed)
    weights = {k: v.clone() for k, v in plain.state_dict().items()}
    packed = tiny_model(cfg, seed)
    assert pack_linears(packed) >= 4 * cfg.num_hidden_layers
    ids, pos = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    with torch.no_grad():
        a, b = plain(ids, pos), packed(ids, pos)
    assert torch.allclose(a, b, atol=1e-4), describe_diff(a, b)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = naive_generate(weights, cfg, prompt, params)
    got = LLM.from_model(packed, num_blocks=32, block_size=4).generate([prompt], params)[0].token_ids
    assert got == want


def test_the_packed_lm_head_is_used_and_state_dict_keeps_plain_weights():
    cfg = tiny_config(tie_word_embeddings=True)
    model = tiny_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pack_linears(model)
    assert isinstance(model.lm_head, PackedLinear)
    sd = model.state_dict()
    assert sd.keys() == before.keys()                      # the tied head adds no lm_head.weight
    for k, v in before.items():
        assert torch.equal(sd[k], v), k                    # plain tensors, not oneDNN's opaque layout
    twin = tiny_model(cfg, seed=1)
    pack_linears(twin)
    twin.load_state_dict(sd)                               # loads into a packed model too
    model.lm_head.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(model.lm_head.weight), 32)
    with torch.no_grad():                                  # the head really runs on the packed copy
        assert model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]])).abs().max() == 0


def test_prepack_refuses_what_it_cannot_do(tmp_path):
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    from minfer.llm import LLM
    cfg = tiny_config(vocab_size=260)
    folder = save_hf_folder(tmp_path / "m", cfg, tiny_model(cfg).state_dict(), *tiny_tokenizer())
    with pytest.raises(ValueError, match="prepack is for one process on the CPU in float32"):
        LLM(str(folder), dtype="float16", prepack=True)
    llm = LLM(str(folder), prepack=True)
    out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == LLM(str(folder)).generate(
        "hello", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0].token_ids


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 12), lo=st.integers(1, 6), width=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_packed_linear_with_a_row_range_is_f_linear_outside_it(rows, lo, width, seed):
    """``rows=(lo, hi)``: outside the range the result IS F.linear's (bit for bit); inside, oneDNN's."""
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(24, 16, generator=gen), torch.randn(rows, 16, generator=gen)
    lin = PackedLinear(w, rows=(lo, lo + width))
    lin.packed = torch.ops.mkldnn._reorder_linear_weight(2 * w, 32)     # tell the two paths apart
    with torch.no_grad():
        got = lin(x)
    want = F.linear(x, 2 * w) if lo <= rows <= lo + width else F.linear(x, w)
    if lo <= rows <= lo + width:
        assert torch.allclose(got, want, atol=1e-4), describe_diff(got, want)
    else:
        assert torch.equal(got, want)


def test_llm_packs_the_batched_rows_by_default_on_cpu(tmp_path):
    """LLM(prepack=None): oneDNN for 4-128 rows; prepack=False: plain nn.Linear; same greedy tokens."""
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    from minfer.kernels.onednn_linear import BATCHED_ROWS
    from minfer.llm import LLM
    cfg = tiny_config(vocab_size=260)
    folder = str(save_hf_folder(tmp_path / "m", cfg, tiny_model(cfg).state_dict(), *tiny_tokenizer()))
    auto, plain = LLM(folder), LLM(folder, prepack=False)
    mlp = auto.model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, PackedLinear) and mlp.down_proj.rows == BATCHED_ROWS
    assert type(plain.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["hello", "a longer prompt here", "x", "abc def"]
    assert [o.token_ids for o in auto.generate(prompts, params)] == \
        [o.token_ids for o in plain.generate(prompts, params)]


def test_a_deep_copy_of_a_packed_model_is_a_plain_model_with_the_same_outputs():
    """oneDNN's opaque layout cannot be copied: a deep copy (the int4 self-draft makes one) unpacks."""
    import copy
    cfg = tiny_config(tie_word_embeddings=True)
    model = tiny_model(cfg)
    pack_linears(model, rows=(4, 128))
    twin = copy.deepcopy(model)
    assert not any(isinstance(m, PackedLinear) for m in twin.modules())
    assert twin.state_dict().keys() == tiny_model(cfg).state_dict().keys()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = model(ids, torch.arange(5)[None]), twin(ids, torch.arange(5)[None])
    assert torch.allclose(a, b, atol=1e-5), describe_diff(a, b)


def test_quantizing_a_packed_model_unpacks_it_first():
    """quantize_model on a prepacked model (LLM's CPU default) quantizes every linear, as on a plain one."""
    from minfer.kernels.onednn_linear import unpack_linears
    from minfer.quant.apply import quantize_model
    cfg = tiny_config(tie_word_embeddings=True)
    plain, packed = tiny_model(cfg), tiny_model(cfg)
    pack_linears(packed, rows=(4, 128))
    quantize_model(plain, "int8")
    quantize_model(packed, "int8")
    assert plain.quantization == packed.quantization and plain.quantization
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(plain(ids, torch.arange(5)[None]), packed(ids, torch.arange(5)[None]))
    assert unpack_linears(packed) == 0


def test_decode_weight_bytes_counts_a_packed_tied_head():
    """A tied LM head reads the whole embedding every step, packed or not."""
    from minfer.bench.quant import decode_weight_bytes
    cfg = tiny_config(tie_word_embeddings=True)
    plain, packed = tiny_model(cfg, 0), tiny_model(cfg, 0)
    pack_linears(packed)
    assert packed.lm_head is not None
    emb = plain.model.embed_tokens.weight
    assert decode_weight_bytes(packed) == decode_weight_bytes(plain)
    assert decode_weight_bytes(plain) == sum(p.numel() * p.element_size() for p in plain.parameters())
    assert emb.numel() * emb.element_size() > 0


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(2, 40), n_in=st.sampled_from([64, 1536, 2048]), n_out=st.sampled_from([16, 96]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_with_min_rows_two_each_row_is_computed_as_alone(rows, n_in, n_out, dtype, seed):
    """Batch invariance (``batch_invariant=True`` sets ``min_rows = 2``): each row of a many-row product
    equals that row computed alone, bit for bit. Without the padding, oneDNN's bf16 kernel for one row
    reduces over K >= 1536 in another order than its kernel for 2+ rows (docs/kernels.md)."""
    assume(why_not_packable(dtype) is None)         # bf16 on an AVX2-only CPU: float32 only
    gen = torch.Generator().manual_seed(seed)
    lin = PackedLinear(torch.randn(n_out, n_in, generator=gen).to(dtype))
    lin.min_rows = 2
    x = torch.randn(rows, n_in, generator=gen).to(dtype)
    with torch.no_grad():
        together, alone = lin(x), torch.cat([lin(x[i:i + 1]) for i in range(rows)])
        assert lin(x[:1][None]).shape == (1, 1, n_out)
    assert torch.equal(together, alone), describe_diff(together.float(), alone.float())


def test_a_dtype_onednn_cannot_pack_here_is_named(monkeypatch):
    """An AVX2-only CPU: oneDNN cannot reorder bf16 weights. PackedLinear and pack_linears say so, naming
    the dtype, instead of oneDNN's internal error; LLM leaves those linears on F.linear."""
    from minfer.kernels import onednn_linear
    monkeypatch.setitem(onednn_linear._why_not, torch.bfloat16, "oneDNN cannot prepack torch.bfloat16 weights")
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(ValueError, match="PackedLinear: oneDNN cannot prepack torch.bfloat16.*F.linear"):
        PackedLinear(w)
    with pytest.raises(RuntimeError, match="cannot prepack torch.bfloat16.*drop the packing option"):
        pack_linears(tiny_model(tiny_config()).to(torch.bfloat16))
    assert why_not_packable(torch.float32) is None
