"""A SentencePiece vocabulary from GGUF metadata -> a ``tokenizers`` BPE model. llama.cpp's SPM tokenizer
(``src/llama-vocab.cpp``) merges the best-scoring pair first; the merges here (every cut of every token in
two, best score first) make HF's BPE choose the same (docs/quantization.md).
"""
from typing import Any

SPACE = "\u2581"                     # SentencePiece's visible space, "▁"
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 3, 4, 6    # llama.cpp's ``llama_token_type``


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) with left, right and left + right all tokens, best result score first; ties in
    token order, then cut position (two cuts of one token are never live at one place in a word)."""
    ids = {tok: i for i, tok in enumerate(tokens)}               # the last of duplicates, as llama.cpp
    ranked = []
    for i, tok in enumerate(tokens):
        if ids[tok] != i:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_tokenizer_json(meta: dict[str, Any], source: str = "GGUF") -> str:
    """``tokenizer.json`` (as a string) for a SentencePiece GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [])
    if len(scores) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for "
                         f"{len(tokens)} tokens")
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=spm_merges(tokens, scores),
                     unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
                     fuse_unk=True, byte_fallback=TOKEN_BYTE in types)
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))      # llama.cpp's default: add one
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE)] * prefix
                                          + [normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    tok.add_tokens([AddedToken(tokens[i], special=(t == TOKEN_CONTROL), normalized=False)
                    for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)])
    return tok.to_str()
