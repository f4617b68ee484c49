"""Structured output (guided decoding): a grammar's token mask, applied per request in the batched sampler.

    SamplingParams(guided_json=schema | guided_regex="..." | guided_choice=[...])
      └─> a grammar ──> one matcher per request (how much of the grammar the output has matched)
    every step, guided rows only: matcher ──fill──> bitmask (G, ceil(V/32)) int32 ──> forbidden = -inf
      sampled token ──> matcher.consume_token; matcher stopped ──> the request finishes with "stop"

JSON follows ``json.dumps``'s layout, so an output ends where the grammar does. The engine is
llguidance (``pip install minfer[guided]``); why, measured against xgrammar and outlines-core:
docs/guided.md. vLLM: ``vllm/v1/structured_output/``. Speculative decoding is refused with it.
"""
import json
import weakref

import torch

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # minfer Tokenizer -> LLTokenizer
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FIELDS = ("guided_json", "guided_regex", "guided_choice")
_NEWER = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "json_object": None}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("guided decoding needs the llguidance package: pip install 'minfer[guided]'") from None
    return llguidance


def is_guided(params) -> bool:
    return any(getattr(params, f, None) is not None for f in FIELDS)


def refuse_speculative(params) -> None:
    if params is not None and is_guided(params):
        raise ValueError("guided decoding (guided_json / guided_regex / guided_choice, response_format) does not run "
                         "with speculative decoding: a rejected draft token would have to be rolled back out of the "
                         "grammar's state; start the model without speculative")


def grammar(params) -> str:
    """The request's grammar (llguidance's JSON form); ValueError naming the field if it is bad."""
    L = _llguidance()
    name = next(f for f in FIELDS if getattr(params, f) is not None)
    value = getattr(params, name)
    try:
        if name == "guided_json":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
            g = L.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        elif name == "guided_regex":
            g = L.LLMatcher.grammar_from_regex(value)
        else:
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
                raise ValueError("a non-empty list of non-empty strings is needed")
            g = L.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    except (ValueError, TypeError) as e:          # json.loads, a schema that is no JSON object
        raise ValueError(f"SamplingParams.{name}: {e}") from None
    error = L.LLMatcher.validate_grammar(g)
    if error:
        raise ValueError(f"SamplingParams.{name}: {' '.join(error.split())[:300]}")
    return g


def check_guided(params) -> None:
    """``SamplingParams.__post_init__``: vLLM's newer ``structured_outputs`` dict -> the guided_* fields;
    at most one of them; its grammar must compile."""
    so = params.structured_outputs
    if so is not None:
        if not isinstance(so, dict) or not set(so) <= set(_NEWER):
            raise ValueError(f"SamplingParams.structured_outputs: a dict with keys among {sorted(_NEWER)}, got {so!r}")
        for key, value in so.items():
            if key == "json_object" and value:
                params.guided_json = {"type": "object"}
            elif key != "json_object" and value is not None:
                setattr(params, _NEWER[key], value)
        params.structured_outputs = None
    given = [f for f in FIELDS if getattr(params, f) is not None]
    if len(given) > 1:
        raise ValueError(f"SamplingParams: give one of guided_json, guided_regex, guided_choice, got {given}")
    if given:
        grammar(params)


def new_matcher(params, tokenizer, vocab_size: int, eos_token_ids):
    """A fresh matcher for one request, over the model's vocabulary (None for an unguided request)."""
    if not is_guided(params):
        return None
    if tokenizer is None:
        raise ValueError("guided decoding needs an engine with a tokenizer")
    L = _llguidance()
    cache = _TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, tuple(eos_token_ids))
    if key not in cache:           # ~0.3 s for a 49k vocabulary: once per tokenizer
        cache[key] = L.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
    return L.LLMatcher(cache[key], grammar(params))


def allowed_tokens(matchers: list, vocab_size: int) -> torch.Tensor:
    """Each matcher's next-token mask -> (G, V) bool. Bit j of int32 word i allows token 32 i + j."""
    import llguidance.torch as lt
    bits = lt.allocate_token_bitmask(len(matchers), vocab_size)          # (G, ceil(V/32)) int32
    for row, m in enumerate(matchers):
        lt.fill_next_token_bitmask(m, bits, row)
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]   # (G, V)


def mask_logits(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """logits (K, V), one matcher or None per row -> logits with every token the grammar forbids at -inf.
    Rows without a matcher are returned as they were; no guided row: ``logits`` itself."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    allowed = allowed_tokens([matchers[i] for i in rows], logits.shape[-1]).to(logits.device)   # (G, V)
    idx = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, idx).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, idx, masked)


def advance(matcher, tok: int) -> bool:
    """The grammar state takes the sampled token -> True when the grammar is complete (the request ends)."""
    matcher.consume_token(tok)
    return matcher.is_stopped() or matcher.is_error()
