"""Peer engines run on the same weights, for honest comparisons.

transformers: the model is rebuilt from minfer's own config and state dict
(``ModelConfig.to_hf``), so both engines multiply exactly the same numbers.
Imported lazily: minfer itself never needs transformers.
"""
from __future__ import annotations

import time

import torch


def hf_model(cfg, state_dict, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """An HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` holding the given weights."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dev extra
        raise RuntimeError("comparing with transformers needs `pip install -e .[dev]`") from e
    d = cfg.to_hf()
    arch = d.pop("architectures")[0]
    conf_cls = transformers.Qwen2Config if arch.startswith("Qwen2") else transformers.LlamaConfig
    model_cls = getattr(transformers, arch)
    hc = conf_cls(**d)
    hc._attn_implementation = attn_implementation
    m = model_cls(hc)
    missing, unexpected = m.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the HF model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m.to(device=device, dtype=dtype).eval()


class StepClock:
    """A transformers streamer that records when each generated step arrives (bench decode, bench serve)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def hf_generate_timed(model, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy generate exactly `max_new_tokens` tokens; TTFT and decode tok/s from token timestamps."""
    ids = torch.tensor([prompt_ids], device=model.device)
    clock = StepClock()
    t0 = time.perf_counter()
    # No EOS at all (rather than min_new_tokens, which would *suppress* EOS and change the
    # greedy choice): exactly what minfer's ignore_eos does.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, streamer=clock, eos_token_id=None, pad_token_id=0)
    # the first put() is the prompt itself, the second the first new token
    first, last = clock.times[1], clock.times[-1]
    n = out.shape[1] - ids.shape[1]
    return {"ttft": first - t0, "decode_tps": (n - 1) / (last - first), "tokens": out[0, ids.shape[1]:].tolist()}
