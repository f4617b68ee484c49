"""bfloat16 on the CPU: the engine's batched steps in bf16 keep the math of the bf16 single-request run.

* Continuous batching in bf16 gives the greedy tokens of the same ``LLM`` fed one prompt per call
  (prefix caching off, so each lone request computes its prompt from scratch), on a tiny model.
* ``batch_invariant=True``: each request's tokens and logprobs, bit for bit, whatever shares its steps.
* bf16 logits stay near fp32's: log-softmax within DESIGN.md's bf16 tolerance (atol 5e-2).
* With bf16 units ``LLM`` prepacks the bf16 linears for every row count (oneDNN, bit for bit
  ``F.linear``'s); a CPU without them is named in one warning and nothing is packed.
"""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import first_difference, tiny_config, tiny_model

from minfer.devices import cpu_bf16_units, warn_if_no_bf16_units
from minfer.kernels.onednn_linear import BATCHED_ROWS, PackedLinear, available, pack_linears, why_not_packable
from minfer.llm import LLM
from minfer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
needs_bf16_packing = pytest.mark.skipif(why_not_packable(torch.bfloat16) is not None,
                                        reason=f"{why_not_packable(torch.bfloat16)}")


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def assert_batched_equals_one_by_one(llm: LLM, prompts: list[list[int]], max_tokens: int) -> None:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, sp)]
    for i, p in enumerate(prompts):
        alone = llm.generate(p, sp)[0].token_ids
        assert batched[i] == alone, f"request {i}: {first_difference(batched[i], alone)}"


@pytest.mark.parametrize("packed", ["no", "every row count", "batched rows"])
def test_bf16_engine_greedy_equals_the_one_by_one_run(packed):
    """Packed as LLM(dtype="bfloat16") packs (every row count), or for 4-128 rows (lone decode rows on F.linear)."""
    model = tiny_model(tiny_config()).to(torch.bfloat16)
    if packed != "no" and (why := why_not_packable(torch.bfloat16)):
        pytest.skip(why)
    if packed != "no":
        rows = BATCHED_ROWS if packed == "batched rows" else None
        assert available() and pack_linears(model, rows=rows) == 2 * 4 + 1
    llm = LLM.from_model(model, enable_prefix_caching=False, max_num_batched_tokens=64)  # prompts split in chunks
    assert llm.engine.runner.cache.decode_kernel in ("cpu", "torch")
    assert_batched_equals_one_by_one(llm, _prompts(12, model.cfg.vocab_size), max_tokens=24)


def _invariant_llm(batch_invariant: bool, budget: int, seed: int = 0) -> LLM:
    """A tiny bf16 model with a 1536-wide MLP (oneDNN's one-row kernel reduces K >= 1536 its own way), packed."""
    model = tiny_model(tiny_config(hidden_size=64, intermediate_size=1536), seed=seed).to(torch.bfloat16)
    pack_linears(model)
    return LLM.from_model(model, enable_prefix_caching=False, max_num_batched_tokens=budget,
                          batch_invariant=batch_invariant)


@needs_bf16_packing
@settings(max_examples=4, deadline=None)
@given(n=st.integers(2, 8), budget=st.sampled_from([16, 48, 64]), seed=st.integers(0, 2**16))
def test_batch_invariant_engine_gives_each_request_its_numbers_alone(n, budget, seed):
    """``batch_invariant=True``: served together, each request gets the greedy tokens AND logprobs (bit for
    bit) it gets served alone, whatever shares its steps and wherever the budget would have cut its prompt.
    Off, it fails at once on the dev machine (logprobs differ; a tiny model's greedy tokens rarely flip)."""
    llm = _invariant_llm(True, budget, seed)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompts = _prompts(n, llm.config.vocab_size, seed)
    batched = llm.generate(prompts, sp)
    for i, p in enumerate(prompts):
        alone = llm.generate(p, sp)[0].outputs[0]
        got = batched[i].token_ids
        assert got == alone.token_ids, f"request {i}: {first_difference(got, alone.token_ids)}"
        assert batched[i].outputs[0].logprobs == alone.logprobs, f"request {i}: logprobs differ"


def test_batch_invariant_names_what_it_needs():
    model = tiny_model(tiny_config())
    with pytest.raises(ValueError, match="batch_invariant=True runs bfloat16.*got torch.float32"):
        LLM.from_model(model, enable_prefix_caching=False, batch_invariant=True)
    m16 = tiny_model(tiny_config()).to(torch.bfloat16)
    if why_not_packable(torch.bfloat16):                  # an AVX2-only CPU: nothing packs in bf16
        with pytest.raises(ValueError, match="bf16 units.*0 packed linears"):
            LLM.from_model(m16, enable_prefix_caching=False, batch_invariant=True)
        return
    pack_linears(m16)
    for bad in ({"enable_prefix_caching": True}, {"enable_prefix_caching": False, "decode_kernel": "torch"},
                {"enable_prefix_caching": False, "enforce_eager": False}):
        with pytest.raises(ValueError, match="enable_prefix_caching=False"):
            LLM.from_model(m16, batch_invariant=True, **bad)


def log_softmax_error(model32, model16, ids: torch.Tensor) -> float:
    """max |log-softmax(bf16 logits) - log-softmax(fp32 logits)| over every position of ``ids`` (1, T)."""
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref, out = (m(ids, pos).float().log_softmax(-1) for m in (model32, model16))
    return (out - ref).abs().max().item()


def test_bf16_logits_near_fp32_on_a_tiny_model():
    model = tiny_model(tiny_config())
    m16 = tiny_model(tiny_config()).to(torch.bfloat16)
    ids = torch.tensor([_prompts(1, model.cfg.vocab_size, seed=3)[0]])
    err = log_softmax_error(model, m16, ids)
    assert 0 < err < 5e-2, f"max |log-softmax bf16 - fp32| = {err}"


def test_a_cpu_without_bf16_units_is_named(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert cpu_bf16_units() is None
    with pytest.warns(UserWarning, match="without AMX or AVX-512 BF16"):
        warn_if_no_bf16_units(torch.device("cpu"), torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_no_bf16_units(torch.device("cpu"), torch.float32)       # float32: nothing to say
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_bf16_units() == "AVX-512 BF16"


def _tiny_folder(tmp_path) -> str:
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    cfg = tiny_config(vocab_size=260)
    return str(save_hf_folder(tmp_path / "m", cfg, tiny_model(cfg).state_dict(), *tiny_tokenizer()))


@pytest.mark.skipif(not (cpu_bf16_units() and available()), reason="needs a CPU with bf16 units and oneDNN")
def test_llm_in_bf16_packs_every_row_count_where_the_cpu_has_bf16_units(tmp_path):
    folder = _tiny_folder(tmp_path)
    auto, plain = LLM(folder, dtype="bfloat16"), LLM(folder, dtype="bfloat16", prepack=False)
    down = auto.model.model.layers[0].mlp.down_proj
    assert isinstance(down, PackedLinear) and down.rows is None and down.packed.dtype == torch.bfloat16
    assert type(plain.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["hello", "a longer prompt here", "x", "abc def", "one more", "and the sixth"]
    assert [o.token_ids for o in auto.generate(prompts, sp)] == [o.token_ids for o in plain.generate(prompts, sp)]


def test_without_bf16_units_nothing_packs_in_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    folder = _tiny_folder(tmp_path)
    with pytest.warns(UserWarning, match="without AMX or AVX-512 BF16"):
        llm = LLM(folder, dtype="bfloat16")
    assert not any(isinstance(m, PackedLinear) for m in llm.model.modules())
    with pytest.raises(ValueError, match="bfloat16 with bf16 units"), pytest.warns(UserWarning):
        LLM(folder, dtype="bfloat16", prepack=True)
