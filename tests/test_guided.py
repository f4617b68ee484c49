"""Structured output (minfer/guided.py): every guided output parses and follows its grammar; the mask
changes nothing where the unguided output already conforms; guided and unguided requests share a batch;
the server's ``response_format`` through the openai client, streamed."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minfer.sampling import SamplingParams

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def llm():
    """A random 2-layer model over a byte-level tokenizer: one token per byte, so any text can be spelled."""
    from test_serving import TOKENIZER_CONFIG, byte_tokenizer_json
    from tiny import tiny_config, tiny_model

    from minfer.llm import LLM
    from minfer.tokenizer import Tokenizer
    model = tiny_model(tiny_config(vocab_size=259, max_position_embeddings=512), seed=1)
    return LLM.from_model(model, Tokenizer.from_json(byte_tokenizer_json(), TOKENIZER_CONFIG),
                          max_num_batched_tokens=256)


def _value_schemas():
    text = st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n})
    number = st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 200})
    enum = st.lists(st.text("abcxyz ", min_size=1, max_size=4), min_size=1, max_size=3, unique=True)
    scalar = st.one_of(text, number, st.just({"type": "boolean"}), enum.map(lambda e: {"enum": e}))
    array = st.tuples(scalar, st.integers(0, 3)).map(lambda a: {"type": "array", "items": a[0], "maxItems": a[1]})
    return st.one_of(scalar, array)


@st.composite
def schemas(draw):
    """Small objects: 1-3 properties of string / integer / boolean / enum / array type, some required."""
    names = draw(st.lists(st.sampled_from(["id", "name", "ok", "tags", "n"]), min_size=1, max_size=3, unique=True))
    props = {k: draw(_value_schemas()) for k in names}
    required = [k for k in names if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas(), seed=st.integers(0, 1000))
def test_every_guided_output_validates(llm, schema, seed):
    """Sampled at temperature 1 from a random model (two prompts, n=2: forked matchers): each output is
    JSON that the schema accepts, and the request ended because the grammar did."""
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=300, n=2, guided_json=schema)
    for out in llm.generate(["a", "{\"x\": 1}"], params):
        for sample in out.outputs:
            assert sample.finish_reason == "stop", sample.text
            jsonschema.validate(json.loads(sample.text), schema)


REGEXES = [r"[a-z ]*", r"(.|\n)*", r"[^e]*", r".{0,40}", r"[ -~]+"]


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=st.lists(st.integers(3, 258), min_size=1, max_size=8), regex=st.sampled_from(REGEXES))
def test_greedy_guided_equals_unguided_where_it_conforms(llm, prompt, regex):
    """The mask only removes tokens: as long as the unguided greedy tokens follow the grammar, the
    guided run picks the same ones; at the first that breaks it, the guided run picks another."""
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    guided = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                 guided_regex=regex))[0].token_ids
    m = llguidance.LLMatcher(llguidance.LLTokenizer(llm.tokenizer._tok.to_str(), n_vocab=259, eos_token=[2]),
                             llguidance.LLMatcher.grammar_from_regex(regex))
    k = m.try_consume_tokens(free)                           # how many unguided tokens the grammar accepts
    assert guided[:k] == free[:k]
    if k < len(free) and len(guided) > k:
        assert guided[k] != free[k]


def test_guided_and_unguided_requests_share_a_batch(llm):
    """A mixed batch gives every request the tokens it gets alone (guided or not, greedy or seeded)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a"]}
    params = [SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=4, max_tokens=40, guided_json=schema),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=5, max_tokens=20, guided_choice=["yes", "no", "maybe so"]),
              SamplingParams(temperature=0, max_tokens=20, guided_regex=r"[0-9]{3}-[a-z]{2}")]
    prompts = ["hello", "json please", "x", "choose", "a code"]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone
    texts = [llm.tokenizer.decode(t) for t in together]
    assert texts[3] in ("yes", "no", "maybe so") and len(texts[4]) == 6 and texts[4][3] == "-"


def test_unguided_rows_are_untouched():
    from minfer.guided import mask_logits
    x = torch.randn(3, 10)
    assert mask_logits(x, [None, None, None]) is x                  # no guided row: no work at all


def test_bad_grammars_name_the_field():
    with pytest.raises(ValueError, match=r"SamplingParams\.guided_json: .*objectx"):
        SamplingParams(guided_json={"type": "objectx"})
    with pytest.raises(ValueError, match=r"SamplingParams\.guided_json"):
        SamplingParams(guided_json="{not json")
    with pytest.raises(ValueError, match=r"SamplingParams\.guided_regex: .*unclosed"):
        SamplingParams(guided_regex="(ab")
    for bad in ([], "yes", ["a", ""]):
        with pytest.raises(ValueError, match=r"SamplingParams\.guided_choice"):
            SamplingParams(guided_choice=bad)
    with pytest.raises(ValueError, match=r"SamplingParams\.guided_regex"):
        SamplingParams(guided_regex=12)
    with pytest.raises(ValueError, match="give one of"):
        SamplingParams(guided_regex="a", guided_choice=["a"])
    with pytest.raises(ValueError, match=r"structured_outputs"):
        SamplingParams(structured_outputs={"grammer": "x"})
    sp = SamplingParams(structured_outputs={"json_object": True})   # vLLM's newer shape
    assert sp.guided_json == {"type": "object"} and sp.structured_outputs is None


def test_missing_package_is_named(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ValueError, match=r"llguidance.*minfer\[guided\]"):
        SamplingParams(guided_regex="a+")


def test_speculative_decoding_refuses_guided_requests(llm):
    from minfer.llm import LLM
    spec = LLM.from_model(llm.model, llm.tokenizer, speculative="prompt_lookup")
    with pytest.raises(ValueError, match="speculative"):
        spec.generate("abc", SamplingParams(temperature=0, guided_regex="[a-z]+"))
    assert spec.generate("abc", SamplingParams(temperature=0, max_tokens=3))[0].token_ids   # still serves


# ---------------------------------------------------------------- the server, through the openai client


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from servers import serve, tiny_model_folder
    folder = tiny_model_folder(tmp_path_factory.mktemp("guided") / "tiny")
    srv = serve(folder, log=tmp_path_factory.mktemp("log") / "server.log").wait()
    yield srv
    srv.stop()


def test_streaming_chat_with_response_format(server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "sunny": {"type": "boolean"}}, "required": ["city", "sunny"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                       response_format=fmt, stream=True, max_tokens=100, seed=1)
    pieces, finish = [], None
    for ev in stream:
        if ev.choices:
            pieces.append(ev.choices[0].delta.content or "")
            finish = ev.choices[0].finish_reason or finish
    assert finish == "stop" and len(pieces) > 2
    jsonschema.validate(json.loads("".join(pieces)), schema)
    done = c.completions.create(model="tiny", prompt="{", max_tokens=100, seed=2, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(done.choices[0].text), schema)
    anything = c.completions.create(model="tiny", prompt="{", max_tokens=5, seed=2,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert anything.choices[0].text.startswith("{")          # any object: a random model need not close it


def test_bad_response_format_is_a_400_naming_the_field(server):
    import httpx
    url = f"{server.url}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    for fmt, field in [({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "yaml"}, "response_format.type")]:
        r = httpx.post(url, json={"messages": msgs, "response_format": fmt}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["message"].startswith(field) and err["param"].startswith("response_format"), err
    r = httpx.post(url, json={"messages": msgs, "guided_regex": "(ab"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text


def test_guided_with_logprobs_through_the_server(server):
    """Masked tokens have logprob -inf; the server floors them (JSON has no -inf) and stays a 200."""
    import httpx
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "yes or no?"}], "guided_choice": ["yes", "no"],
        "logprobs": True, "top_logprobs": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] in ("yes", "no")
    tops = [t["logprob"] for e in choice["logprobs"]["content"] for t in e["top_logprobs"]]
    assert min(tops) == -9999.0                               # at most 2 tokens allowed at the first step
