"""End to end on the real default model, SmolLM2-135M-Instruct (weights fetched on first use)."""
from __future__ import annotations

import pytest
import torch
from tiny import first_difference

from minfer.generate import generate_tokens
from minfer.naive import naive_generate
from minfer.sampling import SamplingParams

pytestmark = pytest.mark.model
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from minfer import LLM
    return LLM(str(smollm2_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(llm):
    pytest.importorskip("transformers")
    from minfer.bench.peers import hf_model
    return hf_model(llm.config, llm.model.state_dict())


def test_config_is_smollm2(llm):
    c = llm.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.hidden_size) == \
        (30, 9, 3, 49152, 576)
    assert c.tie_word_embeddings and c.attention_kind == "GQA"


def test_greedy_32_tokens_identical_to_transformers(llm, hf):
    prompt = llm.tokenizer.encode("The three primary colors are")
    ours = llm.generate(prompt, GREEDY)[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, eos_token_id=None, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref, first_difference(ours, ref)


def test_prompt_logits_equal_transformers(llm, hf):
    prompt = llm.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf(ids).logits
    ours = llm.model(ids, torch.arange(len(prompt))[None])
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_chat_answer_mentions_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.text, out.text
    assert out.finish_reason == "stop"


def test_cached_greedy_equals_naive_oracle_over_64_tokens(llm):
    prompt = llm.tokenizer.encode("Once upon a time, in a small village by the sea,")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    cached = list(generate_tokens(llm.model, prompt, params))
    naive = naive_generate(llm.model.state_dict(), llm.config, prompt, params)
    assert cached == naive, first_difference(cached, naive)


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=1234)
    a = llm.generate("Tell me a joke.", params)[0]
    b = llm.generate("Tell me a joke.", params)[0]
    assert a.token_ids == b.token_ids


def test_stop_string_cuts_text(llm):
    params = SamplingParams(temperature=0, max_tokens=64, stop=["\n"], ignore_eos=True)
    out = llm.generate("Here is a list of fruits:\n1.", params)[0]
    assert "\n" not in out.text and out.finish_reason == "stop"


def test_max_tokens_gives_length_and_timings(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert out.ttft > 0 and out.tpot > 0 and out.tokens_per_s > 0


def test_prompt_longer_than_context_is_a_clear_error(llm):
    too_long = [1] * llm.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        llm.generate(too_long, SamplingParams(max_tokens=1))


def test_bad_token_ids_are_a_clear_error(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([1, 2, 10**9], SamplingParams(max_tokens=1))
