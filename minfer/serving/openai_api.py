"""The OpenAI API as the server and the batch job speak it: request bodies (pydantic, strict mode:
``"0.5"`` is not a number), errors (``{"error": {"message", "type", "param", "code"}}``), responses.
Every field the engine cannot honour (penalties, tools, any field OpenAI does not define) is a 400 naming
it, never ignored (the fields: docs/serving.md). vLLM's equivalent: ``vllm/entrypoints/openai/protocol.py``.
"""
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from minfer.guided import FIELDS
from minfer.logprobs import chat_logprobs, completion_logprobs
from minfer.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16      # OpenAI's legacy completions default; chat: the rest of the context
MAX_STOP_STRINGS = 16
TokenId = Annotated[int, Field(ge=0, lt=2**31)]     # a token id: never negative, fits an int32 tensor


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- Request bodies ---
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)     # unknown fields refused, no type coerced


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False     # vLLM's: usage so far on every chunk (with include_usage)


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: structured output (``minfer/guided.py``)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class _Sampling(_Strict):
    """Fields shared by both endpoints (OpenAI's names; top_k, ignore_eos, stop_token_ids as vLLM's extras)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[TokenId]] = None
    user: Optional[str] = None          # an end-user id for abuse tracking: accepted, not used
    response_format: Optional[ResponseFormat] = None
    guided_json: Union[dict, str, None] = None      # vLLM's extras: one grammar per request
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported by the minfer engine; only 0 is accepted")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
    max_tokens: Optional[int] = Field(None, ge=0)           # 0: only with echo
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(v)}")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        """What the chat template takes (OpenAI's ``developer`` role is the template's ``system``)."""
        return {"role": self.role if self.role != "developer" else "system", "content": self.text()}


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def parse_body(model: type[BaseModel], body, prefix: str = "") -> BaseModel:
    """Validate a decoded JSON body; a 400 naming every bad field (``prefix`` + its path) otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        problems: dict[str, str] = {}                  # field path -> its first problem
        for err in e.errors():
            # union members show up in the location ("prompt.list[int].0"): keep the field path only
            param = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
            msg = "unsupported field: the minfer server does not implement it" \
                if err["type"] == "extra_forbidden" else err["msg"]
            problems.setdefault(param, f"{prefix}{param}: {msg}")
        raise APIError(400, "; ".join(problems.values()), param=next(iter(problems), None)) from None


def sampling_params(req: _Sampling, num_prompt_tokens: int, max_model_len: int, *, chat: bool) -> SamplingParams:
    """The request's SamplingParams; 400 for what the engine cannot do (naming the field)."""
    if chat and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    if not chat and req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 needs echo: true (the prompt's log-probabilities)", param="max_tokens")
    logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
    room = max_model_len - num_prompt_tokens
    asked = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    name = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
    if room < 1:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens, but the model's context is "
                            f"{max_model_len} tokens", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if asked is not None and asked > room:
        raise APIError(400, f"{name}: {num_prompt_tokens} prompt tokens + {asked} new tokens exceed the "
                            f"model's context of {max_model_len} tokens (at most {room})",
                       param=name, code="context_length_exceeded")
    asked = 1 if asked == 0 else asked                     # echo only: one token is generated, then dropped
    max_tokens = asked if asked is not None else (room if chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room))
    guided, blame = guided_fields(req)
    try:
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
                              stop=req.stop, stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                              seed=req.seed, n=req.n, logprobs=logprobs,
                              prompt_logprobs=req.logprobs if not chat and req.echo else None, **guided)
    except ValueError as e:               # a bad grammar or schema, or no grammar engine installed
        message = str(e).replace("SamplingParams.guided_json", blame).replace("SamplingParams.", "")
        field = re.match(r"(\w+)[.:]", message)
        raise APIError(400, message, param=field[1] if field else None) from None


def prompt_ids(req: CompletionRequest | ChatCompletionRequest, tokenizer) -> list[int]:
    """The request's prompt as token ids; a chat's through its template (message text never becomes a
    special token), 400 if the template refuses the conversation."""
    if isinstance(req, CompletionRequest):
        return tokenizer.encode(req.prompt, add_special_tokens=True) if isinstance(req.prompt, str) \
            else list(req.prompt)
    try:
        return tokenizer.encode_chat([m.as_dict() for m in req.messages], add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None


def guided_fields(req: _Sampling) -> tuple[dict, str]:
    """The body's grammar as SamplingParams' guided_* fields, and the field to name if it is bad."""
    guided = {k: getattr(req, k) for k in FIELDS if getattr(req, k) is not None}
    rf = req.response_format
    if rf is None or rf.type == "text":
        return guided, "guided_json"
    if guided:
        raise APIError(400, f"response_format: give it or {next(iter(guided))}, not both", param="response_format")
    if rf.type == "json_object":
        return {"guided_json": {"type": "object"}}, "response_format"
    if rf.json_schema is None:
        raise APIError(400, "response_format.json_schema: required with type json_schema", param="response_format")
    return {"guided_json": rf.json_schema.schema_}, "response_format.json_schema.schema"


# --- Response objects (plain dicts: they go straight to JSON) ---
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def response(rid: str, model: str, chat: bool, choices: list[tuple], use: dict) -> dict:
    """A whole ``text_completion`` / ``chat.completion``; ``choices``: [(text, finish_reason, logprobs)]."""
    out = [{"index": index, "finish_reason": reason, "logprobs": logprobs,
            **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
           for index, (text, reason, logprobs) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": use}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish_reason: str | None = None,
          *, index: int = 0, role: bool = False, use: dict | None = None, with_usage: bool = False,
          logprobs: dict | None = None) -> dict:
    """One streamed event of choice ``index``. ``text=None`` with ``use``: the final usage-only chunk (no choices)."""
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model}
    delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
    piece = {"delta": delta} if chat else {"text": text}
    out["choices"] = [] if text is None else [{"index": index, **piece, "finish_reason": finish_reason,
                                               "logprobs": logprobs}]
    if with_usage or use is not None:
        out["usage"] = use
    return out


@dataclass
class ChoiceShape:
    """How the engine's deltas become a choice's text and ``logprobs`` (OpenAI's shapes, ``minfer/logprobs.py``)."""

    chat: bool
    k: int | None                  # top logprobs per token; None: the request asked for none
    decode: Callable[[int], str]   # token id -> its text
    echo: str | None = None        # completions with echo: the prompt's text, put before the first piece
    prompt_ids: tuple = ()         # ... and its tokens (their logprobs come with the first delta)
    generated: bool = True         # False: max_tokens 0 with echo (the one generated token is dropped)

    def piece(self, text: str, ids: list, dicts: list | None, prompt_dicts: list | None, first: bool,
              offset: int = 0) -> tuple[str, dict | None]:
        """A delta (or a whole choice) -> (text, logprobs or None)."""
        if not self.generated:
            text, ids, dicts = "", [], []
        if first and self.echo is not None:
            text, ids = self.echo + text, list(self.prompt_ids) + list(ids)
            dicts = list(prompt_dicts or [None] * len(self.prompt_ids)) + list(dicts or [])
        if self.k is None:
            return text, None
        if self.chat:
            return text, chat_logprobs(ids, dicts or [], self.k, self.decode)
        return text, completion_logprobs(ids, dicts or [], self.decode, offset)


def choice_shape(req, ids: list[int], params: SamplingParams, tokenizer, *, chat: bool) -> ChoiceShape:
    """Logprobs and echo of a request's choices, for the server and the batch job alike."""
    def decode(t):
        return tokenizer.decode([t], skip_special_tokens=False)
    if chat or not req.echo:
        return ChoiceShape(chat, params.logprobs, decode)
    echo = req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
    return ChoiceShape(chat, params.logprobs, decode, echo, tuple(ids), generated=req.max_tokens != 0)
