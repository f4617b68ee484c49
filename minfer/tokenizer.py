"""Tokenizer: text <-> token ids, chat templates, and streaming detokenization.

``Tokenizer`` is a thin wrapper around HF ``tokenizers.Tokenizer`` (the Rust
library behind every "fast" HF tokenizer) plus the bits of
``tokenizer_config.json`` an inference engine needs: which tokens are BOS/EOS,
whether to prepend BOS, and the Jinja chat template.

``IncrementalDetokenizer`` turns a stream of generated ids into a stream of
text pieces without ever printing half a UTF-8 character.

Where the same code lives elsewhere:
- HF transformers: ``PreTrainedTokenizerBase.apply_chat_template`` (Jinja
  sandbox, ``raise_exception``), ``TextStreamer`` (print on complete words).
- vLLM: ``vllm/transformers_utils/detokenizer_utils.py`` (``detokenize_incrementally``
  with ``prefix_offset`` / ``read_offset``), ``vllm/v1/engine/detokenizer.py``.
- llama.cpp: ``common/chat.cpp`` (templates), ``llama_token_to_piece`` (streaming).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as _HFTokenizer

_MARKER = "MINFER_ASSISTANT_TURN_MARKER"


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores tokens as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode with a ``tokenizers`` model; render chat templates.

    Attributes:
        vocab_size       ids the tokenizer knows (may be below the model's padded vocab)
        bos_token_id     int | None
        eos_token_id     int | None, the tokenizer's own EOS
        eos_token_ids    list[int]: every id that ends generation (EOS, the model
                         config's eos ids, and the token the chat template closes
                         an assistant turn with, e.g. ``<|im_end|>``)
        chat_template    Jinja source or None
    """

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None,
                 extra_eos_token_ids: Iterable[int] = ()) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = self._pick_template(self.config.get("chat_template"))
        ids = [self.eos_token_id, *extra_eos_token_ids, *self._turn_end_token_ids()]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))

    # ------------------------------------------------------------ loading
    @classmethod
    def from_json(cls, tokenizer_json: str, tokenizer_config: dict[str, Any] | None = None,
                  extra_eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """From the text of a ``tokenizer.json`` and a ``tokenizer_config`` dict."""
        return cls(_HFTokenizer.from_str(tokenizer_json), tokenizer_config, extra_eos_token_ids)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """From an HF folder: tokenizer.json (required), tokenizer_config.json,
        chat_template.jinja, and the eos ids of config.json / generation_config.json."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: not found (minfer needs a fast-tokenizer tokenizer.json)")
        try:
            hf_tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise ValueError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
        config = _read_json(folder / "tokenizer_config.json") or {}
        if (folder / "chat_template.jinja").is_file():
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra: list[int] = []
        for name in ("config.json", "generation_config.json"):
            eos = (_read_json(folder / name) or {}).get("eos_token_id")
            extra += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        return cls(hf_tok, config, extra)

    # ------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special-token text such as ``<|im_start|>`` always maps to
        its one id. With ``add_special_tokens`` a BOS is prepended if the
        tokenizer config asks for one (``add_bos_token``) and it is not already there."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:                       # the Rust side only takes valid UTF-8
            raise ValueError("encode(): text is not valid Unicode (a lone surrogate such as "
                             "'\\ud800'?)") from None
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and ids[:1] != [self.bos_token_id]):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Bytes that do not form valid UTF-8 come out as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[int, str]:
        """id -> text of every special (control) token."""
        return {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ------------------------------------------------------------ chat
    @staticmethod
    def _pick_template(template: Any) -> str | None:
        """A template string, or HF's list form [{"name": "default", "template": ...}, ...]."""
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            return named.get("default")
        return template if isinstance(template, str) else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render a conversation into the prompt text the model was trained on.

        ``messages``: [{"role": "system"|"user"|"assistant", "content": str}, ...].
        ``add_generation_prompt`` appends the header of an assistant turn
        (``<|im_start|>assistant\\n``) so the model answers next. Encode the
        result with ``encode(text)``: the template already holds any BOS text.
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json has no "
                             "'chat_template'); build the prompt text yourself and use encode()")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def _turn_end_token_ids(self) -> list[int]:
        """The special token the template writes right after an assistant's text.

        Render a one-exchange conversation with a marker as the assistant's
        answer and look at what follows the marker: for SmolLM2 it is
        ``<|im_end|>``, for Llama 3 ``<|eot_id|>``, for Gemma ``<end_of_turn>``.
        A model that has been chat-tuned emits that token when it is done.
        """
        if self.chat_template is None:
            return []
        try:
            text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": _MARKER}],
                                            add_generation_prompt=False)
        except Exception:                       # templates may insist on other roles
            return []
        tail = text.split(_MARKER, 1)[-1].lstrip()
        matches = [(len(s), i) for i, s in self.special_tokens().items() if tail.startswith(s)]
        return [max(matches)[1]] if matches else []


# ------------------------------------------------------------ jinja


def _compile(template: str):
    """Compile in a sandbox, with the helpers HF templates expect."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------ streaming


class IncrementalDetokenizer:
    """Turn generated ids into text pieces, one ``add(id)`` at a time.

    Why not ``decode([id])`` per token? A token is a run of *bytes*: an emoji
    (4 bytes) may be split over two tokens, and some tokenizers change a
    token's text depending on its neighbours (SentencePiece drops a leading
    space at the start of a decode). So we decode a small window with context
    and emit only the difference — the prefix-offset technique of vLLM's
    ``detokenize_incrementally`` (HF ``TextStreamer`` does the same with a
    growing cache)::

        ids:  ... a  b  c | d  e | f
                          ^      ^
                prefix_offset  read_offset
        prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted
        new_text    = decode(ids[prefix_offset:])              # with the new ids
        emit new_text[len(prefix_text):], then slide both offsets forward.

    If ``new_text`` ends with U+FFFD the last character is not complete yet
    (its remaining bytes are in tokens still to come), so nothing is emitted
    and the offsets stay put; ``flush()`` emits whatever is left at the end.
    Concatenating every piece gives exactly ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0   # start of the context window
        self.read_offset = 0     # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; return the newly completed text (maybe "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Emit what is still held back (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]
