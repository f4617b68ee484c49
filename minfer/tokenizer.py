"""Tokenizer: text <-> token ids, chat templates, and streaming detokenization.
A thin wrapper around HF ``tokenizers`` plus what ``tokenizer_config.json`` holds (BOS/EOS, the
Jinja chat template); ``IncrementalDetokenizer`` never prints half a UTF-8 character (vLLM:
``detokenize_incrementally``). More: docs/architecture.md.
"""
import functools
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as _HFTokenizer

_MARKER = "MINFER_ASSISTANT_TURN_MARKER"
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"             # around each message's text in encode_chat
_MARKED = re.compile(f"[^{_OPEN}{_CLOSE}]*(?:{_OPEN}[^{_OPEN}{_CLOSE}]*{_CLOSE}[^{_OPEN}{_CLOSE}]*)*", re.S)


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores tokens as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode with a ``tokenizers`` model; render chat templates in a bounded sandbox.
    ``eos_token_ids``: every id that ends generation (the tokenizer's EOS, the model config's, and the
    token the chat template ends an assistant turn with). ``source``: named in every template error."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None,
                 extra_eos_token_ids: Iterable[int] = (), source: str = "the model's tokenizer") -> None:
        self._tok = tokenizer
        self.source = str(source)
        self.config = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = self._pick_template(self.config.get("chat_template"))
        extra = [i for i in extra_eos_token_ids if isinstance(i, int) and not isinstance(i, bool)]
        ids = [self.eos_token_id, *extra, *self._turn_end_token_ids()]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))

    @classmethod
    def from_json(cls, tokenizer_json: str, tokenizer_config: dict[str, Any] | None = None,
                  extra_eos_token_ids: Iterable[int] = (), source: str = "the model's tokenizer") -> "Tokenizer":
        """From the text of a ``tokenizer.json`` and a ``tokenizer_config`` dict."""
        try:
            hf_tok = _HFTokenizer.from_str(tokenizer_json)
        except Exception as e:                  # the Rust side raises its own Exception type
            raise ValueError(f"{source}: not a valid tokenizer ({e})") from None
        return cls(hf_tok, tokenizer_config, extra_eos_token_ids, source=source)

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
        return cls(hf_tok, config, extra, source=str(folder))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids; special-token text maps to its one id. ``add_special_tokens``: prepend BOS if the
        config asks (``add_bos_token``) and it is not there yet."""
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

    @staticmethod
    def _pick_template(template: Any) -> str | None:
        """A template string, or HF's list form [{"name": "default", "template": ...}, ...]."""
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            return named.get("default")
        return template if isinstance(template, str) else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) into the prompt text the model was trained on;
        ``add_generation_prompt`` appends an assistant turn's header. The text already holds any BOS."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: this model has no chat template (tokenizer_config.json has no "
                             "'chat_template'); build the prompt text yourself and use encode()")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
        return self._render(messages, add_generation_prompt, CHAT_LIMITS, **kwargs)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """The chat prompt as ids, the messages' text kept apart from the template's special tokens: a
        message holding special-token text is encoded as plain text, so it cannot forge a turn (a template
        that alters message text refuses it). Why: docs/architecture.md."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        specials = [s for s in self.special_tokens().values() if s]
        contents = [m["content"] for m in messages]
        if not any(s in c for c in contents for s in specials):
            return self.encode(text)
        if any(_OPEN in c or _CLOSE in c for c in contents):
            raise ValueError("a message holds the characters U+FDD0 or U+FDD1, which are not text")
        marked = [dict(m, content=f"{_OPEN}{m['content']}{_CLOSE}") for m in messages]
        mtext = self.apply_chat_template(marked, add_generation_prompt, **kwargs)
        pieces = re.split(f"[{_OPEN}{_CLOSE}]", mtext)
        if "".join(pieces) != text or not _MARKED.fullmatch(mtext):
            raise ValueError("a message holds special-token text, and this model's chat template changes "
                             "message text, so it cannot be kept apart from the template's tokens")
        ids: list[int] = []
        for i, piece in enumerate(pieces):         # even: the template's text; odd: a message's
            ids += self._encode_as_text(piece) if i % 2 else self.encode(piece)
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        """Encode with special-token text read as plain text (``<|im_start|>`` -> ``<``, ``|``, ...)."""
        if getattr(self, "_plain", None) is None:  # a copy: the flag must not affect other threads
            self._plain = _HFTokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def _render(self, messages: list, add_generation_prompt: bool, limits: "TemplateLimits", **kwargs) -> str:
        """Render the (cached) compiled chat template under ``limits``; a failure -> ValueError naming it."""
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        try:
            if getattr(self, "_compiled", None) is None:
                self._compiled = _compile(self.chat_template)
            return render_bounded(self._compiled, variables, limits)
        except Exception as e:                  # noqa: BLE001 - untrusted template code
            raise ValueError(f"{self.source}: chat template failed: {type(e).__name__}: {e}"[:2000]) from None

    def _turn_end_token_ids(self) -> list[int]:
        """The special token the template writes right after an assistant's text (a marker answer is
        rendered): SmolLM2 ``<|im_end|>``, Llama 3 ``<|eot_id|>``, Gemma ``<end_of_turn>``."""
        if self.chat_template is None:
            return []
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
        try:                                    # a small, short render: the model is still loading
            text = self._render(messages, False, PROBE_LIMITS)
        except ValueError:                      # templates may insist on other roles, or hit a limit
            return []
        tail = text.split(_MARKER, 1)[-1].lstrip()
        matches = [(len(s), i) for i, s in self.special_tokens().items() if tail.startswith(s)]
        return [max(matches)[1]] if matches else []


# --- jinja ---
@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one render of a chat template (a model file is untrusted input): ``max_range`` items of
    one ``range()``; ``max_size`` characters/items a string or list may reach (``*``, ``+``, ``%``), any
    integer argument, any format width, the whole output; ``seconds`` of wall clock (a timer signal on
    the main thread; elsewhere checked at every range step, call, attribute lookup and output chunk)."""

    max_range: int = 100_000
    max_size: int = 10_000_000
    seconds: float = 5.0


CHAT_LIMITS = TemplateLimits()
PROBE_LIMITS = TemplateLimits(max_range=10_000, max_size=1_000_000, seconds=1.0)   # at load time


class TemplateLimitError(Exception):
    """A chat template's render went past one of its ``TemplateLimits``."""


_state = threading.local()                      # the limits and deadline of the render in progress


def _limits() -> tuple[TemplateLimits, float]:
    lim = getattr(_state, "limits", None) or CHAT_LIMITS
    return lim, getattr(_state, "deadline", None) or float("inf")


def _tick() -> None:
    lim, deadline = _limits()
    if time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took longer than {lim.seconds:g} s")


def _check_size(n: int, what: str) -> None:
    lim, _ = _limits()
    if n > lim.max_size:
        raise TemplateLimitError(f"{what} of {n} would exceed the limit of {lim.max_size}")


_DIGITS = re.compile(r"\d+")


def _format_bound(fmt: str, args: tuple = (), kwargs: dict | None = None) -> int:
    """An upper bound on the length of ``fmt % args`` or ``fmt.format(*args)``: the format string,
    every width/precision written in it (each digit run counted as one), and the arguments."""
    lim, _ = _limits()
    runs = _DIGITS.findall(fmt)
    if any(len(r) > len(str(lim.max_size)) for r in runs):
        raise TemplateLimitError(f"a format width of {max(map(len, runs))} digits exceeds the limit of "
                                 f"{lim.max_size}")
    values = [*(args if isinstance(args, tuple) else (args,)), *(kwargs or {}).values()]
    if len(values) == 1 and isinstance(values[0], dict):
        values = list(values[0].values())
    return len(fmt) + sum(map(int, runs)) + sum(len(v) if _sized(v) else 32 for v in values)


def _join_bound(items: Any, sep: str) -> int:
    items = list(items) if isinstance(items, (list, tuple, str)) else []
    return sum(len(x) if _sized(x) else 32 for x in items) + len(sep) * max(len(items) - 1, 0)


def _result_bound(name: str, value: Any, args: tuple, kwargs: dict, method: bool) -> int | None:
    """An upper bound on a filter's (or str method's) result length, not built; None: it cannot grow much."""
    def arg(i: int, key: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if not isinstance(value, str) and not (name == "join" and not method):
        return None
    if name in ("format", "format_map"):
        return _format_bound(value, args, kwargs)
    if name == "replace":
        old, new, count = str(arg(0, "old", "")), str(arg(1, "new", "")), arg(2, "count", None)
        hits = value.count(old) if old else len(value) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        return len(value) + max(len(new) - len(old), 0) * hits
    if name == "join":
        return _join_bound(arg(0, "iterable", []), value) if method else _join_bound(value, str(arg(0, "d", "")))
    if name == "expandtabs":
        size = arg(0, "tabsize", 8)
        return len(value) + value.count("\t") * (size if isinstance(size, int) else 8)
    if name == "indent":
        width = arg(0, "width", 4)
        return len(value) + (value.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    if name == "wordwrap":
        width, wrap = arg(0, "width", 79), arg(3, "wrapstring", None) or "\n"
        return len(value) + (len(value) // max(width if isinstance(width, int) else 1, 1) + 1) * len(str(wrap))
    if name in ("escape", "e", "forceescape"):
        return 6 * len(value)                    # '"' -> '&#34;'
    if name == "urlencode":
        return 12 * len(value)                   # a 4-byte character -> '%F0%9F%98%80'
    return None


def _check_result(name: str, value: Any, args: tuple, kwargs: dict, method: bool) -> None:
    bound = _result_bound(name, value, args, kwargs, method)
    if bound is not None:
        _check_size(bound, f"the result of {name}()")


class _BoundedRange:
    """``range`` for templates: at most max_range items, the clock checked at every step."""

    def __init__(self, *args):
        self._r = range(*args)
        lim, _ = _limits()
        if len(self._r) > lim.max_range:
            raise TemplateLimitError(f"range() of {len(self._r)} items exceeds the limit of {lim.max_range}")

    def __iter__(self):
        for i in self._r:
            _tick()
            yield i

    def __len__(self):
        return len(self._r)

    def __getitem__(self, i):
        return self._r[i]


def _sized(x: Any) -> bool:
    return isinstance(x, (str, list, tuple))


def _make_environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox plus size and time bounds on the operations that can blow up."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "*":
                seq, n = (left, right) if _sized(left) else (right, left)
                if _sized(seq) and isinstance(n, int):
                    _check_size(len(seq) * max(n, 0), "a repeated string/list")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right > 4096:
                    raise TemplateLimitError(f"power with exponent {right} is too large")
            elif operator == "+" and _sized(left) and _sized(right):
                _check_size(len(left) + len(right), "a concatenation")
            elif operator == "%" and isinstance(left, str):
                _check_size(_format_bound(left, right), "a formatted string")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):
            _tick()
            for a in (*args, *kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool):
                    _check_size(abs(a), "an integer argument")
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):           # a str method: its result's size, before it is built
                _check_result(getattr(__obj, "__name__", ""), owner, args, kwargs, method=True)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            owner = getattr(value, "__self__", None)
            if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
                def bounded(*args, **kwargs):
                    _check_result(value.__name__, owner, args, kwargs, method=True)
                    return value(*args, **kwargs)
                return bounded
            return super().wrap_str_format(value)

        def getattr(self, obj, attribute):
            _tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _tick()
            return super().getitem(obj, argument)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _BoundedRange
    return env


def _bounded_filter(name: str, f):
    """A filter whose int arguments (a width, a count: ``center(10**9)``) and whose result's size
    (``'%0999999999d'|format(1)``, ``replace``, ``join``, ``indent``, ...) are checked first."""
    skip = 2 if hasattr(f, "jinja_pass_arg") else 1        # (context,) value, then the arguments

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        _tick()
        for a in (*args[skip:], *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool):
                _check_size(abs(a), f"the argument of |{name}")
        if len(args) >= skip:
            _check_result(name, args[skip - 1], args[skip:], kwargs, method=False)
        if name == "tojson":
            indent = kwargs.get("indent", args[skip + 1] if len(args) > skip + 1 else None)
            if indent:
                _check_size(_tojson_bound(args[skip - 1], indent), "the result of tojson()")
        return f(*args, **kwargs)
    return bounded


def _tojson_bound(x: Any, indent: Any) -> int:
    """Indented JSON: at most every character on its own line, indented ``depth x indent``."""
    compact = json.dumps(x, ensure_ascii=False)
    width = indent if isinstance(indent, int) else len(str(indent or ""))
    depth, level = 0, [x]
    while level:                                 # breadth first, one comprehension per level
        depth += 1
        level = [w for v in level if isinstance(v, (dict, list, tuple))
                 for w in (v.values() if isinstance(v, dict) else v)]
    return len(compact) * (1 + max(width, 0) * depth)


def _compile(template: str):
    """Compile in the bounded sandbox, with the helpers HF templates expect
    (HF transformers: ``utils/chat_template_utils.py``)."""
    return _make_environment().from_string(template)


def render_bounded(compiled, variables: dict[str, Any], limits: TemplateLimits = CHAT_LIMITS) -> str:
    """Render a compiled template under ``limits``; TemplateLimitError when one is exceeded."""
    _state.limits, _state.deadline = limits, time.monotonic() + limits.seconds
    use_timer = (threading.current_thread() is threading.main_thread()
                 and signal.getitimer(signal.ITIMER_REAL)[0] == 0)

    def on_timer(signum, frame):
        raise TemplateLimitError(f"rendering took longer than {limits.seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_timer) if use_timer else None
    try:
        if use_timer:
            signal.setitimer(signal.ITIMER_REAL, limits.seconds)
        out, size = [], 0
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            _check_size(size, "the rendered text")
            _tick()
            out.append(chunk)
        return "".join(out)
    finally:
        if use_timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
        _state.limits = _state.deadline = None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, a 5,000-digit integer, 100k-deep nesting
        raise ValueError(f"{path}: not valid JSON ({e})"[:300]) from None
    return data if isinstance(data, dict) else None


# --- streaming ---
class IncrementalDetokenizer:
    """Generated ids -> text pieces, one ``add(id)`` at a time, never half a UTF-8 character (vLLM's
    ``detokenize_incrementally``; the pieces concatenate to ``decode(all_ids)``; docs/architecture.md)."""

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
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit what is still held back (an incomplete character shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""
