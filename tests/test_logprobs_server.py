"""Log-probabilities through ``minfer serve`` (a real process), read by real clients.

* ``/v1/completions`` with ``echo``, ``logprobs`` and ``max_tokens: 0`` (the loglikelihood request of
  evaluation harnesses): OpenAI's {tokens, token_logprobs, top_logprobs, text_offset}, equal to the
  oracle's log-softmax (``minfer/naive.py``); with generation, equal to ``LLM.generate``'s, streamed or not.
* ``/v1/chat/completions`` with ``logprobs`` + ``top_logprobs``: ``choices[].logprobs.content[]``, streamed
  or not, through the official ``openai`` client.
* Limits are 400s naming the field.
* lm-evaluation-harness's ``local-completions`` scores a multiple-choice task (tests/fixtures/lm_eval: a
  YAML and a JSONL, no hub download) through the server: its accuracy and every loglikelihood equal
  the same task scored in-process from ``LLM.generate``'s prompt logprobs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from minfer.naive import naive_forward
from minfer.sampling import SamplingParams
from servers import serve, stop_all, tiny_model_folder

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")       # the in-process oracle

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("lp") / "tiny")


@pytest.fixture(scope="module")
def llm(folder):
    from minfer.llm import LLM
    return LLM(str(folder))


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    s = serve(folder, "--max-num-batched-tokens", "16", log=tmp_path_factory.mktemp("log") / "server.log").wait()
    yield s
    stop_all([s])


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_echo_with_max_tokens_0_gives_the_prompts_logprobs(server, llm):
    prompt = "The capital of France is"
    r = client(server.url).completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    ch, ids = r.choices[0], llm.tokenizer.encode(prompt)
    assert ch.text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = ch.logprobs
    assert "".join(lp.tokens) == prompt and lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = torch.log_softmax(naive_forward(llm.model.state_dict(), llm.config, ids), dim=-1)   # (T, V)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < ATOL
        top = ref[i - 1].topk(5).indices.tolist()
        assert len(lp.top_logprobs[i]) <= 6 and {llm.tokenizer.decode([t]) for t in top} <= set(lp.top_logprobs[i])


def test_completion_logprobs_equal_llm_generate_streamed_or_not(server, llm):
    prompt, body = "Once upon a time", dict(max_tokens=6, temperature=0, logprobs=2)
    want = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=2))[0]
    c = client(server.url)
    r = c.completions.create(model="tiny", prompt=prompt, **body).choices[0]
    assert r.text == want.text and len(r.logprobs.tokens) == len(want.token_ids)
    for got, tok, d in zip(r.logprobs.token_logprobs, want.token_ids, want.outputs[0].logprobs):
        assert abs(got - d[tok].logprob) < 1e-5
    events = list(c.completions.create(model="tiny", prompt=prompt, stream=True, **body))
    streamed = [x for e in events for ch in e.choices if ch.logprobs for x in ch.logprobs.token_logprobs]
    assert streamed == pytest.approx(r.logprobs.token_logprobs, abs=1e-6)
    assert "".join(ch.text for e in events for ch in e.choices) == want.text
    echoed = c.completions.create(model="tiny", prompt=prompt, echo=True, stream=True, **body)
    first = next(iter(echoed)).choices[0]
    assert first.text.startswith(prompt) and first.logprobs.token_logprobs[0] is None


def test_chat_logprobs_equal_llm_chat_streamed_or_not(server, llm):
    msgs = [{"role": "user", "content": "Hi there"}]
    want = llm.chat(msgs, SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    c = client(server.url)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for e, tok, d in zip(content, want.token_ids, want.outputs[0].logprobs):
        assert abs(e.logprob - d[tok].logprob) < 1e-5 and e.bytes == list(e.token.encode())
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            sorted((x.logprob for x in d.values() if x.rank <= 3), reverse=True), abs=1e-5)
    events = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, stream=True)
    streamed = [x for e in events for ch in e.choices if ch.logprobs for x in ch.logprobs.content]
    assert [x.logprob for x in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs", "5"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs",
     "logprobs: true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs", "20"),
])
def test_logprobs_limits_are_400s_naming_the_field(server, path, body, param, words):
    r = httpx.post(server.url + path, json=body, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], r.text


# ---------------------------------------------------------------- lm-evaluation-harness

def in_process_loglikelihoods(llm, docs) -> list[list[float]]:
    """Each choice's loglikelihood after its question, from LLM.generate's prompt logprobs, tokenized as
    lm-eval's ``_encode_pair`` does (context alone, then context + " " + choice)."""
    pairs = [(llm.tokenizer.encode(d["question"] + " " + c), len(llm.tokenizer.encode(d["question"])))
             for d in docs for c in d["choices"]]
    outs = llm.generate([whole for whole, _ in pairs], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    lls = [sum(r.prompt_logprobs[i][whole[i]].logprob for i in range(n_ctx, len(whole)))
           for r, (whole, n_ctx) in zip(outs, pairs)]
    sizes = [len(d["choices"]) for d in docs]
    return [lls[sum(sizes[:j]):sum(sizes[:j + 1])] for j in range(len(docs))]


def lm_eval_vs_in_process(url: str, name: str, folder, llm, tmp_path, monkeypatch) -> float:
    """Run the fixture task through lm-eval against ``url``; assert it equals the in-process scores."""
    lm_eval = pytest.importorskip("lm_eval")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = FIXTURES / "tiny_choice.jsonl"
    (tmp_path / "tiny_choice.yaml").write_text((FIXTURES / "tiny_choice.yaml").read_text()
                                              .replace("DATA_FILE", str(data)))
    from lm_eval.tasks import TaskManager
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)     # only ours: no index of lm-eval's
    res = lm_eval.simple_evaluate(
        model="local-completions", tasks=["minfer_tiny_choice"], task_manager=tasks,
        model_args={"base_url": f"{url}/v1/completions", "model": name, "tokenizer": str(folder),
                    "tokenizer_backend": "huggingface", "max_retries": 1, "num_concurrent": 1},
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    mine = in_process_loglikelihoods(llm, docs)
    samples = sorted(res["samples"]["minfer_tiny_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for s, lls in zip(samples, mine):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(lls, abs=ATOL)
    acc = sum(max(range(len(lls)), key=lls.__getitem__) == d["answer"] for lls, d in zip(mine, docs)) / len(docs)
    assert res["results"]["minfer_tiny_choice"]["acc,none"] == acc
    print(f"lm-eval acc {acc:.4f} = in-process acc on {len(docs)} docs ({name})")
    return acc


def test_lm_eval_local_completions_scores_as_minfer_does(server, llm, folder, tmp_path, monkeypatch):
    lm_eval_vs_in_process(server.url, "tiny", folder, llm, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.model
def test_lm_eval_on_smollm2(smollm2_dir, tmp_path, monkeypatch):
    """The same on SmolLM2-135M-Instruct, where the task is easy enough for the accuracy to mean something."""
    from minfer.llm import LLM
    folder = smollm2_dir
    s = serve(folder, log=tmp_path / "server.log").wait()
    try:
        acc = lm_eval_vs_in_process(s.url, Path(folder).name, folder, LLM(str(folder)), tmp_path, monkeypatch)
    finally:
        stop_all([s])
    assert acc > 0.5


def test_logprobs_mode_flag_reaches_the_engine(folder):
    """``minfer serve --logprobs-mode`` (vLLM's flag) is an engine argument like the others."""
    import argparse
    from minfer.serving.async_engine import build_engine
    from minfer.serving.http_common import add_engine_args, engine_args
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args([]).logprobs_mode == "raw_logprobs"
    args = p.parse_args(["--logprobs-mode", "processed_logprobs"])
    assert build_engine(str(folder), **engine_args(args)).logprobs_mode == "processed_logprobs"
    with pytest.raises(SystemExit):
        p.parse_args(["--logprobs-mode", "softmax"])
