"""Tokenizer: round trips, agreement with transformers' GGUF tokenizer, streaming, chat.

Uses the SmolLM2 tokenizer that fetch rebuilt from the GGUF metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings, strategies as st

from minfer.checkpoints.gguf_import import _pre_tokenizer, read_gguf_metadata, tokenizer_from_metadata
from minfer.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.model

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Mixed scripts, emoji (4-byte UTF-8, ZWJ sequences), combining marks, whitespace.
VARIED = [
    "Hello, world!", "The year 2024 had 366 days.", "x = 12345 + 0.5e-3",
    "def f(x):\n    return x ** 2  # square\n", "if (a&&b) { return -1; }",
    "Grüße aus Köln", "日本語のテキスト", "Привет, мир", "مرحبا",
    "🦙🔥 llamas", "👩‍👩‍👧 family",
    "e\u0301 combining", "tabs\tand\ttabs", "trailing spaces   ", "   leading", "line\nbreaks\r\n",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "it's we'll they've", "",
]
# A whitespace run right before a digit: SmolLM2 splits digits *before* the
# GPT-2 regex (llama.cpp's "smollm" pre-tokenizer, and HF's own tokenizer.json
# for SmolLM2: Digits(individual_digits) then ByteLevel). transformers' GGUF
# converter uses plain ByteLevel and splits the whitespace run differently.
DIGIT_AFTER_SPACES = {
    "a  1": ["a", "ĠĠ", "1"],
    "\t\t3.14": ["ĉĉ", "3", ".", "1", "4"],
    "x\n\n2": ["x", "ĊĊ", "2"],
}

# SmolLM2's byte-level vocab lacks 21 of the 256 byte tokens (no unk token
# either), so BPE silently drops those bytes, exactly as HF and llama.cpp do:
# 6 control characters, the never-valid UTF-8 bytes 0xC0 0xC1 0xF5-0xFF, and
# the lead bytes 0xF1 0xF2 of code points U+40000-U+BFFFF (unassigned planes).
MISSING_BYTES = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
encodable_chars = st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs",),
                                exclude_characters="\x04\x06\x13\x14\x16\x1d") \
    | st.characters(min_codepoint=0xC0000, exclude_categories=("Cs",))
encodable_text = (st.text(encodable_chars, max_size=100)
                  | st.text(alphabet="ab1 \n\t😀é中\u0301.", max_size=40))


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir) -> Path:
    source = json.loads((smollm2_dir / "minfer_source.json").read_text())
    path = smollm2_dir / source["gguf_file"]
    if not path.is_file():
        pytest.skip(f"{path} was deleted; fetch again with force=True")
    return path


@pytest.fixture(scope="module")
def rebuilt(smollm2_gguf) -> tuple[str, dict]:
    """tokenizer.json text and tokenizer_config rebuilt from the GGUF metadata now."""
    return tokenizer_from_metadata(read_gguf_metadata(smollm2_gguf))


@pytest.fixture(scope="module")
def tok(rebuilt) -> Tokenizer:
    return Tokenizer.from_json(*rebuilt)


def test_saved_tokenizer_is_current(smollm2_dir, rebuilt):
    saved = Tokenizer.from_folder(smollm2_dir)
    assert json.loads(saved._tok.to_str()) == json.loads(rebuilt[0]), \
        "weights/ holds a tokenizer.json that differs from what the converter builds now"
    assert saved.config == rebuilt[1]


# ------------------------------------------------------------ ids <-> text


@settings(max_examples=200, deadline=None)
@given(encodable_text)
def test_decode_encode_roundtrip(tok, s):
    assert tok.decode(tok.encode(s), skip_special_tokens=False) == s


def test_bytes_missing_from_vocab(tok):
    from tokenizers.pre_tokenizers import ByteLevel
    # ByteLevel.alphabet() is GPT-2's bytes_to_unicode image; rebuild the byte -> char map
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    char_of = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    assert set(char_of.values()) == set(ByteLevel.alphabet())
    missing = {b for b, c in char_of.items() if tok.token_to_id(c) is None}
    assert missing == MISSING_BYTES
    assert tok.decode(tok.encode("a\x04b")) == "ab"           # dropped, not mapped to unk
    assert tok.decode(tok.encode("\U00040000")) != "\U00040000"


def test_specials_and_basics(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    assert tok.decode(tok.encode("<|im_end|>hi")) == "hi"                    # specials skipped
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")    # add_bos_token is False
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("\ud800")


def test_digits_split_before_whitespace_regex(tok):
    for text, tokens in DIGIT_AFTER_SPACES.items():
        assert [tok.id_to_token(i) for i in tok.encode(text)] == tokens, text


def test_matches_transformers_gguf_tokenizer(tok, smollm2_gguf, tmp_path):
    """Same ids as ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``.

    The GGUF sits alone in a temp folder so transformers cannot pick up our
    tokenizer.json instead of converting the GGUF itself.
    """
    transformers = pytest.importorskip("transformers")
    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=smollm2_gguf.name)
    for text in VARIED:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
    for text in DIGIT_AFTER_SPACES:          # the documented difference (see above)
        assert tok.encode(text) != hf.encode(text, add_special_tokens=False), repr(text)


def test_other_pre_tokenizers_group_digits():
    pieces = lambda pre, s: [p for p, _ in _pre_tokenizer(pre).pre_tokenize_str(s)]
    assert pieces("llama-bpe", "x 12345") == ["x", "Ġ", "123", "45"]      # \p{N}{1,3}
    assert pieces("qwen2", "x 12345") == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert pieces("gpt-2", "x 12345") == ["x", "Ġ12345"]
    with pytest.raises(ValueError, match="not supported; supported: smollm"):
        _pre_tokenizer("mystery")


# ------------------------------------------------------------ streaming


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.fixture(scope="module")
def high_byte_ids(tok) -> list[int]:
    """Single-byte tokens for bytes 0x80-0xFF: the pieces of multi-byte characters."""
    from tokenizers.pre_tokenizers import ByteLevel
    chars = sorted(ByteLevel.alphabet())
    ids = [tok.token_to_id(c) for c in chars]
    # bytes_to_unicode maps bytes >= 0xA1 (and a few more) to chars >= U+00A1
    return [i for c, i in zip(chars, ids) if i is not None and ord(c) >= 0xA1]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_equals_full_decode_on_random_ids(tok, high_byte_ids, data):
    any_id = st.integers(0, tok.vocab_size - 1)
    ids = data.draw(st.lists(any_id | st.sampled_from(high_byte_ids), max_size=30))
    skip = data.draw(st.booleans())
    assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None)
@given(encodable_text)
def test_incremental_never_emits_broken_chars(tok, s):
    assume("\ufffd" not in s)
    pieces = _stream(tok, tok.encode(s), skip_special_tokens=False)
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "".join(pieces) == s


def test_incremental_holds_back_split_emoji(tok):
    ids = tok.encode(" 😀")                 # ["ĠðŁĺ", "Ģ"]: the emoji's bytes span two tokens
    assert len(ids) == 2
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[0]) == ""          # 3 of 4 bytes: nothing to show yet
    assert detok.add(ids[1]) == " 😀"
    assert detok.flush() == ""


# ------------------------------------------------------------ chat


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert text == (f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.token_to_id("<|im_end|>")) == 2
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n")
    assert tok.eos_token_ids == [2]


def test_chat_template_errors(tok):
    with pytest.raises(ValueError, match="messages must be"):
        tok.apply_chat_template([{"role": "user"}])
    no_template = Tokenizer(tok._tok, {"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    strict = Tokenizer(tok._tok, {"chat_template": "{{ raise_exception('only user turns') }}"})
    with pytest.raises(ValueError, match="chat template failed: TemplateError: only user turns"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


def test_eos_ids_include_turn_end_token(tok):
    """EOS is <|endoftext|>, but the template ends assistant turns with <|im_end|>."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}")
    t = Tokenizer(tok._tok, {"eos_token": "<|endoftext|>", "chat_template": template})
    assert t.eos_token_ids == [0, 2]


def test_tokenizer_from_metadata_rejects_unknown_model():
    with pytest.raises(ValueError, match="tokenizer.ggml.model 't5'"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="tokenizer.ggml.scores has 0 entries for 1 tokens"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


# ------------------------------------------------------------ SentencePiece vocabularies (Gemma)


def spm_reference(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SPM tokenizer, plainly: spaces -> "▁"; from single characters, merge the adjacent
    pair whose concatenation is a token with the highest score (leftmost on ties) until none is left;
    a piece that is no token becomes its UTF-8 bytes <0xXX>."""
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = list(text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(pieces) - 1):
            j = ids.get(pieces[i] + pieces[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return [k for p in pieces for k in ([ids[p]] if p in ids else [ids[f"<0x{b:02X}>"] for b in p.encode()])]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab c\u00e9", max_size=14), seed=st.integers(0, 2**16))
def test_spm_vocabulary_tokenizes_as_llama_cpp(text, seed):
    """A random SentencePiece vocabulary with random scores: the BPE model built from it (merges =
    every cut of every token, best score first) gives llama.cpp's greedy-by-score ids; byte fallback
    for the character outside the vocabulary; decoding gives the text back."""
    import random

    from minfer.checkpoints.gguf_spm import spm_tokenizer_json
    rng = random.Random(seed)
    chars = ["a", "b", "c", "\u2581"]
    words = {"".join(rng.choice(chars) for _ in range(rng.randint(2, 4))) for _ in range(12)}
    tokens = [f"<0x{b:02X}>" for b in range(256)] + chars + sorted(words)
    scores = [0.0] * 256 + [rng.uniform(-50, 0) for _ in tokens[256:]]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": [6] * 256 + [1] * (len(tokens) - 256),
            "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_json(spm_tokenizer_json(meta))
    assert tok.encode(text) == spm_reference(text, tokens, scores)
    assert tok.decode(tok.encode(text)) == text
