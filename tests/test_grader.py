"""The exercise grader: right answers pass, wrong ones fail with a counterexample.

Also the engine's own property tests: each registered exercise's property is
run on the engine's implementation, the same check a learner is graded by.
"""
import math

import pytest
import torch

from minfer.lessons import CheckResult, check, exercises, grade, run
from minfer.model import rms_norm
from minfer.sampling import top_p_filter
from minfer.speculative.prompt_lookup import ngram_propose
from minfer.speculative.rejection import accept_reject
from minfer.kv.block_pool import block_hashes, compute_slot_mapping
from minfer.lessons.ex_paged import append_to_block_table, can_append_tokens
from minfer.attention.flash import online_softmax_update
from minfer.lessons.ex_foundations import kv_append_with_cache
from minfer.serving.metrics import percentile, tpot_from_timestamps
from minfer.lessons.ex_serving import continuous_step
from minfer.quant.int8 import dequantize_int8, quantize_int8
from minfer.quant.int4 import pack_int4, unpack_int4
from minfer.serving.cost import dollars_per_mtok, kwh_per_mtok
from minfer.serving.router import ring_lookup
from minfer.distributed.layers import shard_weight
from minfer.distributed.tensor_parallel import allreduce_bytes_per_token
from minfer.generate import generate_tokens
from minfer.lessons.ex_loops import paged_decode_attention_reference, schedule_step_reference
from minfer.speculative import generate_speculative
from minfer.sampling import SamplingParams
from minfer.kv.evict import h2o_keep
from minfer.compress.losses import topk_distill_kl
from minfer.speculative.medusa import tree_mask
from minfer.bench.machine import mbu
from minfer.lessons.ex_compilers import pad_batch, pad_to_bucket, qkv_fused
from minfer.lessons.ex_spec import pool_harvest
from minfer.engine.output import stream_cut
from minfer.compress.prune import prune_ffn
from minfer.distributed.pipeline import gpipe_schedule
from minfer.distributed.disagg import prompt_kv
from minfer.attention.mask import allowed
from minfer.attention.reference import reference_attention
from minfer.kv.quantized import quantize_kv
from minfer.bench.machine import linear_intensity
from minfer.lessons.ex_metrics import goodput_from_events, static_step_reference, ttft_from_events
from minfer.quant.gguf_formats import _q4_k_scales_and_mins, dequantize_q4_k

# ---------------------------------------------------------------- the engine passes


ENGINE = {
    "model.rms_norm": rms_norm,
    "sampling.top_p": top_p_filter,
    "speculative.accept_reject": accept_reject,
    "speculative.ngram_propose": ngram_propose,
    "paged.slot_mapping": compute_slot_mapping,
    "paged.can_append": can_append_tokens,
    "paged.append_slots": append_to_block_table,
    "paged.block_hashes": block_hashes,
    "kv.append": kv_append_with_cache,                  # ContiguousKVCache.update on one layer
    "attention.online_softmax_update": online_softmax_update,
    "serving.tpot": tpot_from_timestamps,
    "serving.percentile": percentile,
    "serving.continuous_step": continuous_step,
    "quant.quantize_int8": quantize_int8,
    "quant.dequantize_int8": dequantize_int8,
    "quant.pack_int4": pack_int4,
    "quant.unpack_int4": unpack_int4,
    "quant.q4k_scales_mins": _q4_k_scales_and_mins,
    "quant.dequantize_q4_k": dequantize_q4_k,                    # validate: gguf.quants, bit for bit
    "roofline.linear_intensity": linear_intensity,
    "attention.window_mask": allowed,
    "attention.gqa_attention": reference_attention,              # validate: a loop over heads in float64
    "kv.quantize_int8": quantize_kv,
    "serving.ttft": ttft_from_events,                            # RequestStats.ttft of stats_from_events
    "serving.goodput": goodput_from_events,                      # summarize(...).goodput
    "serving.static_step": static_step_reference,                # Scheduler.schedule, policy="static"
    "router.ring_lookup": ring_lookup,
    "cost.dollars_per_mtok": dollars_per_mtok,
    "cost.kwh_per_mtok": kwh_per_mtok,
    "parallel.shard_weight": shard_weight,
    "parallel.allreduce_bytes_per_token": allreduce_bytes_per_token,
    "serving.schedule_step": schedule_step_reference,            # Scheduler.schedule on the same state
    "paged.decode_attention": paged_decode_attention_reference,   # slot mapping + reference attention
    "speculative.greedy_loop": lambda target, draft, prompt, n, gamma: list(generate_speculative(
        target, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
        f"draft:tiny,gamma={gamma}", draft=draft)),
    "generate.greedy_decode": lambda model, prompt, n, eos: list(generate_tokens(
        model, prompt, SamplingParams(temperature=0.0, max_tokens=n),
        eos_token_ids=[] if eos is None else [eos])),
    "compress.distill_kl": topk_distill_kl,
    "compress.medusa_tree_mask": tree_mask,
    "compress.h2o_keep": h2o_keep,
    "fusion.qkv_fused": qkv_fused,
    "cuda_graph.pad_to_bucket": pad_to_bucket,
    "roofline.mbu": mbu,
    "lookahead.ngram_pool": pool_harvest,                          # NgramPool.harvest on a copy of the pool
    "cuda_graph.pad_batch": pad_batch,                            # StaticDecodeRunner.load's static buffers
    "output.stream_cut": stream_cut,
    "compress.prune_ffn": prune_ffn,
    "parallel.gpipe_schedule": gpipe_schedule,
    "parallel.prompt_kv": prompt_kv,
    "parallel.kv_handoff_bytes": lambda P, L, nkv, hd, bs, b: sum(t.nbytes for t in prompt_kv(   # what is sent
        *[torch.zeros(L, -(-P // bs), bs, nkv, hd, dtype={1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[b])] * 2,
        list(range(-(-P // bs))), P)),
}


def test_every_exercise_has_an_engine_test():
    assert set(exercises.names()) <= set(ENGINE), "add the new exercise to ENGINE"


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_engine_passes_its_exercise(name):
    """The engine's property test: the very property the learner is graded by."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # the loop exercises run many tiny forwards
    try:
        run(exercises.get(name), ENGINE[name], max_examples=3 * exercises.get(name).max_examples)
    finally:
        torch.set_num_threads(threads)


def own_rms_norm(x, weight, eps):
    """A learner's correct rms_norm (check rejects the engine's own function)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


def _grade(name, fn):
    """The property without the engine-call watch: for variants built on the engine's function."""
    return grade(exercises.get(name), fn)


def test_check_passes_the_reference(capsys):
    result = check("model.rms_norm", own_rms_norm)
    assert isinstance(result, CheckResult)
    assert result.passed and result and result.status == "passed"
    assert result.counterexample is None
    assert result.examples == 100
    out = capsys.readouterr().out
    assert out.strip() == result.message
    assert out.startswith("✅ check('model.rms_norm'): passed")


# ---------------------------------------------------------------- wrong rms_norm


def rms_norm_without_eps(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * weight


def rms_norm_without_weight(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_with_mean(x, weight, eps):
    return x * torch.rsqrt(x.mean(-1, keepdim=True) + eps) * weight


def rms_norm_eps_outside_the_root(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def rms_norm_over_all_dims(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean() + eps) * weight


def rms_norm_in_half(x, weight, eps):
    return (x.half() * torch.rsqrt(x.half().pow(2).mean(-1, keepdim=True) + eps)).float() * weight


@pytest.mark.parametrize("fn", [rms_norm_without_eps, rms_norm_without_weight,
                                rms_norm_with_mean, rms_norm_over_all_dims, rms_norm_in_half,
                                rms_norm_eps_outside_the_root])
def test_wrong_rms_norm_fails_with_a_counterexample(fn, capsys):
    result = check("model.rms_norm", fn)
    assert not result.passed and result.status == "wrong"
    assert set(result.counterexample) == {"x", "weight", "eps"}
    assert isinstance(result.expected, torch.Tensor)
    msg = result.message
    assert msg.startswith(f"❌ check('model.rms_norm'): wrong answer from {fn.__name__}")
    assert "smallest failing example" in msg and "x      = tensor(" in msg
    assert "expected (minfer):" in msg and "yours:" in msg
    assert "first wrong at index" in msg
    assert "Traceback" not in msg
    assert capsys.readouterr().out.strip() == msg


def test_missing_eps_shrinks_to_a_zero_row():
    result = check("model.rms_norm", rms_norm_without_eps)
    x = result.counterexample["x"]
    assert x.numel() == 1 and x.item() == 0.0          # rsqrt(0) = inf, 0 * inf = nan
    assert "yours nan" in result.message


def test_the_report_is_the_same_every_run():
    a = grade(exercises.get("model.rms_norm"), rms_norm_with_mean)
    b = grade(exercises.get("model.rms_norm"), rms_norm_with_mean)
    assert a.message == b.message


def test_wrong_shape_and_missing_return_are_explained():
    def keepdim_lost(x, weight, eps):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight).sum(-1)

    def no_return(x, weight, eps):
        x * 2

    assert "expected shape" in check("model.rms_norm", keepdim_lost).message
    assert "did you forget `return`?" in check("model.rms_norm", no_return).message


def test_dtype_is_checked():
    def float64(x, weight, eps):
        return rms_norm(x.double(), weight.double(), eps)

    result = _grade("model.rms_norm", float64)
    assert not result.passed and "dtype torch.float64, expected torch.float32" in result.message


def test_in_place_edits_of_the_inputs_do_not_confuse_the_grader():
    def in_place(x, weight, eps):
        return x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).mul_(weight)

    assert check("model.rms_norm", in_place).passed


# ---------------------------------------------------------------- stubs, errors


def rms_norm_stub(x, weight, eps):
    """What the student edition hands out."""
    # YOUR CODE HERE
    raise NotImplementedError


def test_a_stub_is_reported_as_not_implemented(capsys):
    result = check("model.rms_norm", rms_norm_stub)
    assert not result.passed and result.status == "not_implemented"
    assert result.message == ("❌ check('model.rms_norm'): not implemented yet: write the body "
                              "of rms_norm_stub in the cell above (it still raises "
                              "NotImplementedError)")
    assert capsys.readouterr().out.strip() == result.message


def test_an_exception_is_one_line_with_the_inputs():
    def crashes(x, weight, eps):
        return x.view(-1, 3) * weight

    result = check("model.rms_norm", crashes)
    assert not result.passed and result.status == "raised"
    first = result.message.splitlines()[0]
    assert first.startswith("❌ check('model.rms_norm'): crashes raised RuntimeError: ")
    assert "at line" in first and "x.view(-1, 3)" in first
    assert "x      = tensor(" in result.message
    assert "Traceback" not in result.message


@pytest.mark.parametrize("fn", [None, 42, "rms_norm"])
def test_not_a_function(fn):
    result = check("model.rms_norm", fn)
    assert not result.passed and result.status == "error"
    assert "expected a function" in result.message


def test_a_function_that_changes_its_mind_is_reported():
    calls = []

    def moody(x, weight, eps):
        calls.append(1)
        out = rms_norm(x, weight, eps)
        return out + 1 if len(calls) % 3 == 0 else out

    result = _grade("model.rms_norm", moody)
    assert not result.passed
    assert result.status in {"error", "wrong"}


def test_unknown_exercise_lists_the_known_ones():
    with pytest.raises(ValueError, match="known exercises: .*model.rms_norm.*sampling.top_p"):
        check("model.rms_nrom", rms_norm)


def test_run_raises_assertion_error_with_the_report():
    with pytest.raises(AssertionError, match="wrong answer from rms_norm_with_mean"):
        run(exercises.get("model.rms_norm"), rms_norm_with_mean)


def test_a_broken_reference_is_not_blamed_on_the_learner():
    def broken_reference(x, weight, eps):
        raise RuntimeError("engine bug")

    result = grade(exercises.get("model.rms_norm"), rms_norm, reference=broken_reference)
    assert result.status == "error" and "a bug in minfer, not in your code" in result.message


def test_the_definition_check_catches_a_wrong_reference():
    """validate() compares with the definition, so the engine test is not circular."""
    with pytest.raises(AssertionError, match="disagrees with the definition"):
        run(exercises.get("model.rms_norm"), rms_norm_without_weight, reference=rms_norm_without_weight)


# ---------------------------------------------------------------- top_p


def _sorted(logits, stable=False):
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=stable)
    return order, torch.softmax(sorted_logits.float(), dim=-1)


def _drop(logits, order, drop_sorted):
    return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted),
                              -math.inf)


def top_p_one_too_few(logits, top_p):
    """Drops the token that crosses top_p (cumsum > top_p), keeps the top-1."""
    order, probs = _sorted(logits)
    drop = torch.cumsum(probs, -1) > top_p
    drop[..., 0] = False
    return _drop(logits, order, drop)


def top_p_one_too_many(logits, top_p):
    """Keeps one token after the one that crosses top_p."""
    order, probs = _sorted(logits)
    right = torch.cumsum(probs, -1) - probs >= top_p
    drop = torch.zeros_like(right)
    drop[..., 1:] = right[..., :-1]
    return _drop(logits, order, drop)


def top_p_forgets_top1(logits, top_p):
    order, probs = _sorted(logits)
    return _drop(logits, order, torch.cumsum(probs, -1) > top_p)


def top_p_minus_1e9(logits, top_p):
    order, probs = _sorted(logits)
    drop = torch.cumsum(probs, -1) - probs >= top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -1e9)


def top_p_forgets_to_unsort(logits, top_p):
    order, probs = _sorted(logits)
    return logits.masked_fill(torch.cumsum(probs, -1) - probs >= top_p, -math.inf)


@pytest.mark.parametrize("fn", [top_p_one_too_few, top_p_one_too_many, top_p_forgets_top1,
                                top_p_minus_1e9, top_p_forgets_to_unsort])
def test_wrong_top_p_fails_with_a_counterexample(fn):
    result = check("sampling.top_p", fn)
    assert not result.passed and result.status == "wrong", result.message
    assert set(result.counterexample) == {"logits", "top_p"}
    assert "smallest failing example" in result.message
    assert "expected (minfer):" in result.message


def test_top_p_too_few_names_the_missing_mass():
    msg = check("sampling.top_p", top_p_one_too_few).message
    assert "too few tokens" in msg and "probabilities, most likely first" in msg
    assert "expected keeps tokens" in msg


def test_top_p_too_many_says_so():
    assert "too many tokens" in check("sampling.top_p", top_p_one_too_many).message


def test_top_p_minus_1e9_is_told_to_use_minus_inf():
    assert "exactly -inf" in check("sampling.top_p", top_p_minus_1e9).message


def test_top_p_other_valid_formulations_pass():
    def hf_style(logits, top_p):
        """HF transformers: sort ascending, drop while the mass so far <= 1 - top_p."""
        sorted_logits, order = torch.sort(logits, dim=-1)
        mass = torch.softmax(sorted_logits.float(), -1).cumsum(-1)
        drop = mass <= 1 - top_p
        drop[..., -1] = False
        return logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)

    def other_ties(logits, top_p):
        """Breaks ties the other way round: later index first."""
        flipped = logits.flip(-1)
        return top_p_filter(flipped, top_p).flip(-1)

    assert check("sampling.top_p", hf_style).passed
    assert _grade("sampling.top_p", other_ties).passed


def test_top_p_stub_and_batch_inputs():
    def top_p_stub(logits, top_p):
        raise NotImplementedError

    assert check("sampling.top_p", top_p_stub).status == "not_implemented"
    seen = []

    def spy(logits, top_p):
        seen.append(logits.dim())
        return top_p_filter(logits, top_p)

    assert _grade("sampling.top_p", spy).passed
    assert set(seen) == {1, 2}
