"""GGUF: block formats bit-exact against gguf-py, and read_gguf against llama.cpp's layout.

- dequantize() of every supported format equals ``gguf.quants.dequantize``
  (llama.cpp's own numpy reference) bit for bit, on random data;
- a tiny GGUF written here the way ``convert_hf_to_gguf.py`` writes one
  (q/k rows permuted) reads back to exactly the original HF tensors;
- the real SmolLM2 file gives, tensor for tensor, what transformers' GGUF
  loader gives.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings, strategies as st

from minfer.checkpoints.gguf_import import hf_name, read_gguf, unpermute_qk
from minfer.checkpoints.hf import expected_shapes
from minfer.config import ModelConfig
from minfer.quant.gguf_formats import FORMATS, dequantize


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    assert tuple(ours.shape) == ref.shape, f"shape {tuple(ours.shape)} != {ref.shape}"
    a, b = ours.numpy().view(np.int32), ref.view(np.int32)
    if not np.array_equal(a, b):
        i = np.argwhere(a != b)[0]
        raise AssertionError(f"first difference at {tuple(i)}: ours {ours.numpy()[tuple(i)]!r}, "
                             f"gguf-py {ref[tuple(i)]!r} ({int((a != b).sum())} values differ)")


# ------------------------------------------------------------ formats


def test_block_sizes_match_gguf_py():
    for name, fmt in FORMATS.items():
        assert gguf.GGML_QUANT_SIZES[T[name]] == (fmt.block_size, fmt.type_size), name


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), n_blocks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-4, 1.0, 300.0]), constant_row=st.booleans())
def test_dequantize_matches_gguf_py(qtype, rows, n_blocks, seed, scale, constant_row):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 32 * n_blocks)) * scale).astype(np.float32)
    if constant_row:
        x[0] = x[0, 0]            # max == min: the scale-is-zero corner of Q4_1 / Q8_0
    q = gguf.quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(q, qtype)
    assert_bit_equal(dequantize(torch.from_numpy(np.array(q)), qtype, x.shape), ref)


@pytest.mark.parametrize("qtype, f16_fields", [(T.Q4_K, [(0, 2), (2, 4)]), (T.Q6_K, [(208, 210)]),
                                               (T.Q5_0, [(0, 2)])],
                         ids=["Q4_K", "Q6_K", "Q5_0"])
@settings(max_examples=30, deadline=None)
@given(n_blocks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_k_quants_and_q5_0_match_gguf_py(qtype, f16_fields, n_blocks, seed):
    """Random block bytes, except the f16 scales, which are set to finite values."""
    rng = np.random.default_rng(seed)
    size = FORMATS[qtype.name].type_size
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for lo, hi in f16_fields:
        scales = (rng.standard_normal((n_blocks, 1)) * 10.0 ** rng.integers(-4, 2)).astype(np.float16)
        blocks[:, lo:hi] = scales.view(np.uint8)
    ref = gguf.quants.dequantize(blocks, qtype)
    assert_bit_equal(dequantize(torch.from_numpy(blocks), qtype, ref.shape), ref)


def test_q4_1_layout_by_hand():
    """One block written byte by byte: value j sits in the low nibble of byte j,
    value j+16 in its high nibble, and x = d*q + m."""
    d, m = np.float16(0.5), np.float16(-1.0)
    q = np.arange(32) % 16                                   # the 4-bit values we want
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([d]).view(np.uint8), np.array([m]).view(np.uint8), packed])
    x = dequantize(torch.from_numpy(block), "Q4_1", (32,))
    assert torch.equal(x, torch.tensor(0.5 * q - 1.0, dtype=torch.float32))


def test_q5_0_layout_by_hand():
    """Value i: low 4 bits in byte 6 + i % 16 (low nibble for i < 16, high for i >= 16),
    5th bit = bit i of the little-endian uint32 qh; x = d * (q - 16)."""
    q = (np.arange(32) * 7) % 32                            # the 5-bit values we want
    qh = np.array([sum(int(q[i] >> 4) << i for i in range(32))], dtype="<u4").view(np.uint8)
    low = q & 0x0F
    packed = (low[:16] | (low[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([np.float16(0.25)]).view(np.uint8), qh, packed])
    x = dequantize(torch.from_numpy(block), "Q5_0", (32,))
    assert torch.equal(x, torch.tensor(0.25 * (q - 16), dtype=torch.float32))


def test_dequantize_bad_input():
    with pytest.raises(ValueError, match=r"Q5_K.*supported types: F32, F16, BF16, Q8_0"):
        dequantize(torch.zeros(176, dtype=torch.uint8), "Q5_K", (256,))
    with pytest.raises(ValueError, match="needs 20 bytes, got 19"):
        dequantize(torch.zeros(19, dtype=torch.uint8), T.Q4_1, (32,))
    with pytest.raises(ValueError, match="whole number"):
        dequantize(torch.zeros(20, dtype=torch.uint8), T.Q4_1, (2, 16))


# ------------------------------------------------------------ q/k permutation


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF halves -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@given(n_head=st.integers(1, 4), half=st.integers(1, 4), cols=st.sampled_from([(), (3,)]))
def test_unpermute_inverts_llama_cpp_permute(n_head, half, cols):
    w = np.arange(n_head * 2 * half * (cols[0] if cols else 1), dtype=np.float32)
    w = w.reshape(n_head * 2 * half, *cols)
    back = unpermute_qk(torch.from_numpy(llama_cpp_permute(w, n_head)), n_head)
    assert torch.equal(back, torch.from_numpy(w))


def test_permutation_pairs_rotary_halves():
    """In the GGUF layout rows (2i, 2i+1) of a head are HF rows (i, i + d/2)."""
    d = 8
    hf = torch.arange(d, dtype=torch.float32).reshape(d, 1)          # one head, row r holds r
    gguf_rows = torch.from_numpy(llama_cpp_permute(hf.numpy(), 1)).flatten().tolist()
    assert gguf_rows == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpermute_qk(torch.tensor(gguf_rows).reshape(d, 1), 1).flatten().tolist() == list(range(d))


# ------------------------------------------------------------ a tiny GGUF file

_LAYER_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def gguf_name(name: str) -> str:
    if name in _GLOBAL_GGUF:
        return _GLOBAL_GGUF[name]
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER_GGUF[module]}.{kind}"


def tiny_tokens() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel
    return SPECIALS + sorted(ByteLevel.alphabet()) + ["he", "ll", "hell", "Ġw"]


def write_tiny_gguf(path, arch: str, cfg: ModelConfig, sd: dict[str, torch.Tensor], pre="smollm",
                    embed_type=T.Q8_0) -> None:
    """Write ``sd`` as llama.cpp would: q/k permuted (llama only), embedding as ``embed_type``."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = tiny_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, t in sd.items():
        a = t.numpy()
        if arch == "llama" and ".q_proj." in name:
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, embed_type), raw_dtype=embed_type)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_gguf_config(arch="llama", n_kv=2, tied=True) -> ModelConfig:
    return ModelConfig(vocab_size=len(tiny_tokens()), hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=n_kv, intermediate_size=96,
                       rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                       attention_bias=(arch == "qwen2"), max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, model_type=arch)


@pytest.mark.parametrize("arch, n_kv, tied", [("llama", 2, True), ("llama", 1, False), ("qwen2", 2, True)])
def test_read_tiny_gguf_roundtrip(tmp_path, arch, n_kv, tied):
    cfg = tiny_gguf_config(arch, n_kv, tied)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in expected_shapes(cfg).items()}
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch, cfg, sd, pre="qwen2" if arch == "qwen2" else "smollm")

    cfg2, sd2, tok_json, tok_cfg = read_gguf(path)
    assert cfg2.to_hf() == cfg.to_hf()
    assert set(sd2) == set(sd)
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":       # went through Q8_0
            q = gguf.quants.quantize(t.numpy(), T.Q8_0)
            assert_bit_equal(sd2[name], gguf.quants.dequantize(q, T.Q8_0))
        else:
            assert torch.equal(sd2[name], t), name
    assert tok_cfg["bos_token"] == "<|im_start|>" and tok_cfg["eos_token"] == "<|im_end|>"
    assert "chat_template" in tok_cfg

    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tok_json)
    enc = tok.encode("hello world<|im_end|>")
    assert enc.tokens == ["hell", "o", "Ġw", "o", "r", "l", "d", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "hello world<|im_end|>"


def test_read_gguf_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="bad.gguf"):
        read_gguf(bad)
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_name("rope_freqs.weight")
    cfg = tiny_gguf_config()
    sd = {k: torch.zeros(s) for k, s in expected_shapes(cfg).items()}
    write_tiny_gguf(tmp_path / "q5.gguf", "llama", cfg, sd, embed_type=T.Q5_1)
    with pytest.raises(ValueError, match=r"q5.gguf: tensor token_embd.weight: .*'Q5_1' is not supported"):
        read_gguf(tmp_path / "q5.gguf")


# ------------------------------------------------------------ the real file


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir):
    source = json.loads((smollm2_dir / "minfer_source.json").read_text())
    path = smollm2_dir / source["gguf_file"]
    if not path.is_file():
        pytest.skip(f"{path} was deleted; fetch again with force=True")
    return path


@pytest.fixture(scope="module")
def smollm2_read(smollm2_gguf):
    """read_gguf of the real file, once per module (about 3 s)."""
    return read_gguf(smollm2_gguf)


@pytest.mark.model
def test_real_gguf_matches_transformers(smollm2_gguf, smollm2_read, smollm2_dir):
    """Every tensor equals transformers' GGUF import (which un-permutes q/k itself).

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` needs the
    ``accelerate`` package in transformers 5, which minfer does not depend on,
    so we call the function it uses to build the state dict,
    ``load_gguf_checkpoint`` (same dequantization, same
    ``LlamaTensorProcessor`` un-permutation), with a meta-device model that
    only supplies the parameter names.
    """
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from minfer.checkpoints import load_hf_folder

    cfg, ours, _, _ = smollm2_read
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
    theirs = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=hf_model)["tensors"]
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name

    # the converted folder in weights/ holds exactly these tensors
    cfg_folder, folder_sd = load_hf_folder(smollm2_dir)
    assert cfg_folder.to_hf() == cfg.to_hf()
    assert all(torch.equal(folder_sd[k], ours[k]) for k in ours)


@pytest.mark.model
def test_real_gguf_config(smollm2_read):
    """The numbers of SmolLM2-135M-Instruct's own HF config.json."""
    cfg, sd, _, tok_cfg = smollm2_read
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (49152, 576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.intermediate_size, cfg.max_position_embeddings) == (1536, 8192)
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (100000.0, 1e-5)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in sd
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["add_bos_token"] is False
