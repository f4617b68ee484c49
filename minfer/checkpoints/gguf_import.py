"""Read a llama.cpp GGUF file (parsed by ``gguf.GGUFReader``) into minfer's HF-named state dict and tokenizer:
metadata -> ModelConfig, ``blk.N.xxx`` -> HF names, blocks -> float32, q/k rows -> HF rotary layout.
llama.cpp ``convert_hf_to_gguf.py`` writes them; vLLM ``gguf_loader.py`` (docs/quantization.md).
"""
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from minfer.checkpoints.gguf_spm import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, spm_tokenizer_json
from minfer.checkpoints.hf import check_shapes, check_state_dict
from minfer.config import ModelConfig
from minfer.quant.gguf_formats import dequantize
from minfer.validation import is_int, is_real

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# --- Tensor names ---
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {                       # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 (llama.cpp ``LLM_ARCH_GEMMA3`` tensors, HF ``Gemma3DecoderLayer`` names): a norm after
# attention and after the MLP, and the pre-MLP norm is ``ffn_norm`` -> ``pre_feedforward_layernorm``.
_GEMMA3_LAYER_NAMES = {**_LAYER_NAMES,
                       "ffn_norm": "pre_feedforward_layernorm",
                       "post_attention_norm": "post_attention_layernorm",
                       "post_ffw_norm": "post_feedforward_layernorm",
                       "attn_q_norm": "self_attn.q_norm",
                       "attn_k_norm": "self_attn.k_norm"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    hint = " (Llama-3 rope frequency factors are not supported)" if gguf_name.startswith("rope_freqs") else ""
    raise ValueError(f"GGUF tensor {gguf_name!r} has no minfer equivalent{hint}")


# --- q/k rows ---
def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q or k projection (weight or bias; for k, ``n_head`` = KV heads):
    its RoPE pairs neighbours, HF's ``rotate_half`` the two halves (docs/quantization.md)."""
    rows = w.shape[0]
    head_dim = rows // n_head
    rest = w.shape[1:]
    w = w.reshape(n_head, head_dim // 2, 2, *rest)           # (heads, d/2 pairs, 2, cols)
    return w.transpose(1, 2).reshape(rows, *rest).contiguous()  # (heads*d, cols), halves layout


# --- Metadata ---
def _metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, ints, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                          source: str) -> ModelConfig:
    """The ``{arch}.*`` keys -> ModelConfig (names as in HF ``LlamaConfig``)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ValueError(f"{source}: metadata key {full!r} is missing")
        return default

    def number(key: str, default: Any = KeyError, real: bool = False) -> Any:
        value, kind = get(key, default), "a finite number" if real else "an integer"
        if not (is_real(value) if real else value is None or is_int(value)):
            raise ValueError(f"{source}: metadata {arch}.{key} must be {kind}, got {value!r:.80}")
        return float(str(np.float32(value))) if real else value     # float32 read as 1e-05, not 9.99...e-06

    rope_scaling = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": number("rope.scaling.factor", float("nan"), True)}
    elif scaling_type != "none":
        raise ValueError(f"{source}: rope scaling {scaling_type!r:.80} is not supported (only 'linear')")
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError(f"{source}: tensor 'token_embd.weight' is missing")
    n_head = number("attention.head_count")
    try:                                        # ModelConfig checks every number before using it
        config = ModelConfig(
            vocab_size=tensor_shapes["token_embd.weight"][0],
            hidden_size=number("embedding_length"),
            num_hidden_layers=number("block_count"),
            num_attention_heads=n_head,
            num_key_value_heads=number("attention.head_count_kv", n_head),
            head_dim=number("attention.key_length", None),
            intermediate_size=number("feed_forward_length"),
            rope_theta=number("rope.freq_base", 10000.0, real=True),
            rope_scaling=rope_scaling,
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5, real=True),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            max_position_embeddings=number("context_length"),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            model_type=arch,
        )
        if arch == "gemma3":
            config = _gemma3_config(config, number("attention.sliding_window"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if number("rope.dimension_count", config.head_dim) != config.head_dim:
        raise ValueError(f"{source}: partial rotary ({arch}.rope.dimension_count != head_dim) "
                         f"is not supported")
    return config


def _gemma3_config(config: ModelConfig, window: int) -> ModelConfig:
    """What a Gemma 3 GGUF leaves out, as llama.cpp hard-codes it for LLM_ARCH_GEMMA3 (``llama-model.cpp``:
    ``set_swa_pattern(6)``, SWA rope base 10000, scale 1 / sqrt(head_dim); ``models/gemma3.cpp``: embeddings
    times sqrt(n_embd), GELU-gated FFN, sandwich norms stored as 1 + w) and HF ``Gemma3TextConfig``."""
    from minfer.config import gemma3_layer_types
    return dataclasses.replace(
        config, model_type="gemma3_text", sliding_window=window,
        layer_types=gemma3_layer_types(config.num_hidden_layers), rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=config.head_dim, qk_norm=True, sandwich_norm=True, norm_offset=1.0,
        hidden_act="gelu_pytorch_tanh", embed_scale=float(config.hidden_size) ** 0.5)


# --- Tokenizer ---
# llama.cpp splits text into words with one regex per ``tokenizer.ggml.pre`` (``src/llama-vocab.cpp``),
# an HF ``tokenizers`` pre-tokenizer; byte-level BPE then maps bytes to printable characters and merges.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre: str):
    """The HF pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` name."""
    from tokenizers import Regex, pre_tokenizers as pt
    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)   # GPT-2's own regex
    if pre in ("gpt-2", "mpt", "olmo"):
        return gpt2
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # every digit on its own, *before* the GPT-2 regex (llama.cpp: "\p{N}" first)
        return pt.Sequence([pt.Digits(individual_digits=True), gpt2])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pt.Sequence([pt.Split(Regex(split), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported; supported: "
                     "smollm, starcoder, refact, codeshell, gpt-2, mpt, olmo, llama-bpe, llama3, qwen2")


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "GGUF") -> tuple[str, dict[str, Any]]:
    """Rebuild ``tokenizer.json`` (as a string) and ``tokenizer_config`` from GGUF metadata: byte-level BPE
    (HF: ``integrations/ggml.py``) or SentencePiece (``gguf_spm``); docs/quantization.md."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tokenizer_json = _bpe_tokenizer_json(meta)
    elif model == "llama":
        tokenizer_json = spm_tokenizer_json(meta, source)
    else:
        raise ValueError(f"{source}: tokenizer.ggml.model {model!r} is not supported "
                         "(minfer rebuilds byte-level BPE, 'gpt2', and SentencePiece, 'llama', tokenizers)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def token_str(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_str("bos"),
        "eos_token": token_str("eos"),
        "unk_token": token_str("unknown"),
        "pad_token": token_str("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        config["model_max_length"] = int(meta[f"{arch}.context_length"])
    return tokenizer_json, {k: v for k, v in config.items() if v is not None}


def _bpe_tokenizer_json(meta: dict[str, Any]) -> str:
    """Byte-level BPE ``tokenizer.json`` text from ``tokenizer.ggml.tokens`` / ``merges``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"))
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=(t == TOKEN_CONTROL), normalized=False)
             for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_tokens(added)   # keeps each token's `special` flag and its existing id
    return tok.to_str()


# --- read_gguf ---
def check_tensor_ranges(path: Path | str, file_size: int, tensors: list[tuple[str, int, int]]) -> None:
    """Every tensor's declared bytes ``(name, start, n_bytes)`` must lie inside the file and apart from
    every other tensor's (else 1,024 layers on the same bytes become gigabytes of float32)."""
    for name, start, n_bytes in tensors:
        if start + n_bytes > file_size:
            raise ValueError(f"{path}: truncated at byte {file_size} (tensor {name} needs {n_bytes} bytes "
                             f"from byte {start})")
    ordered = sorted(tensors, key=lambda t: (t[1], t[1] + t[2]))
    for (a, a_start, a_n), (b, b_start, b_n) in zip(ordered, ordered[1:]):
        if b_n and a_n and b_start < a_start + a_n:
            raise ValueError(f"{path}: tensors {a} (bytes {a_start}-{a_start + a_n}) and {b} (bytes "
                             f"{b_start}-{b_start + b_n}) overlap; each tensor needs its own bytes")


def check_memory(path: Path | str, nbytes: int) -> None:
    """The converted tensors must fit in the memory this machine has available now."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return                                   # no /proc (not Linux): nothing to compare against
    if nbytes > avail:
        raise MemoryError(f"{path}: its tensors need {nbytes / 2**30:.1f} GiB once converted, more than the "
                          f"{avail / 2**30:.1f} GiB of memory available")


def _open(path: Path):
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class CheckedReader(GGUFReader):
        """llama.cpp's reader, with the tensors' declared byte ranges checked against the file first."""

        def _build_tensors(self, start_offs, fields):
            ranges = []
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                except ValueError:
                    raise ValueError(f"tensor {name}: unknown type {int(raw_type[0])}") from None
                n = math.prod(int(d) for d in dims)
                ranges.append((name, int(start_offs) + int(offset[0]), n * type_size // block))
            check_tensor_ranges(path, len(self.data), ranges)
            super()._build_tensors(start_offs, fields)

    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return CheckedReader(path)
    except Exception as e:                          # bad magic, truncated file, ...
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: not a readable GGUF file ({e})") from None


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (no tensor data is read)."""
    return _metadata(_open(Path(path)))


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = False
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None, dict[str, Any]]:
    """Read a GGUF file -> (config, state dict in HF names, tokenizer.json text or None, tokenizer_config);
    tensors dequantized, un-permuted, cast to ``dtype``. ``progress``: a tqdm bar."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    config = _config_from_metadata(meta, shapes, str(path))
    arch = meta.get("general.architecture")
    try:                                        # every name and shape, before any tensor is converted
        check_shapes(config, {hf_name(n, arch): shape for n, shape in shapes.items()}, str(path))
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [int(t.n_elements) for t in reader.tensors]
    check_memory(path, sum(sizes) * itemsize + 4 * max(sizes, default=0))   # + one float32 tensor in flight
    state_dict: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", disable=not progress):
        try:
            name = hf_name(t.name, arch)
            raw = torch.from_numpy(np.array(t.data))    # copy out of the read-only memory map
            w = dequantize(raw, t.tensor_type, shapes[t.name])   # float32, (out, in) or (n,)
        except ValueError as e:                     # unknown tensor or block format
            raise ValueError(f"{path}: tensor {t.name}: {e}") from None
        if config.model_type == "llama" and ".q_proj." in name:
            w = unpermute_qk(w, config.num_attention_heads)
        elif config.model_type == "llama" and ".k_proj." in name:
            w = unpermute_qk(w, config.num_key_value_heads)
        elif config.norm_offset and name.endswith("norm.weight"):
            w = w - config.norm_offset        # llama.cpp stores Gemma's norms as 1 + w (convert_hf_to_gguf.py)
        state_dict[name] = w.to(dtype)
    check_state_dict(config, state_dict, str(path))

    if "tokenizer.ggml.tokens" not in meta:
        return config, state_dict, None, {}
    try:
        tokenizer_json, tokenizer_config = tokenizer_from_metadata(meta, str(path))
    except Exception as e:                      # noqa: BLE001 - malformed metadata: lists of the wrong type, ...
        msg = f"{type(e).__name__}: {e}"[:500]
        raise ValueError(msg if str(path) in msg else f"{path}: invalid tokenizer metadata ({msg})") from None
    return config, state_dict, tokenizer_json, tokenizer_config
