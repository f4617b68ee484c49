"""Tiny random Llama configs and models for fast tests (no weights needed)."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from minfer.config import ModelConfig
from minfer.model import build_model


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                rope_theta=1000.0)
    base.update(kw)
    if "head_dim" not in kw:
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    return ModelConfig(**base)


def tiny_gemma_config(**kw) -> ModelConfig:
    """Gemma-3-shaped: MQA, every 3rd layer global (the others a window of 4), QK-norm, sandwich norms,
    (1 + w) norms, GeGLU, scaled embeddings, a local RoPE base, head_dim apart from hidden / heads."""
    from minfer.config import gemma3_layer_types
    n = kw.pop("num_hidden_layers", 4)
    base = dict(num_hidden_layers=n, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                hidden_size=24, model_type="gemma3_text", layer_types=gemma3_layer_types(n, 3),
                sliding_window=4, rope_theta=100000.0, rope_local_base_freq=1000.0,
                query_pre_attn_scalar=16, qk_norm=True, sandwich_norm=True, norm_offset=1.0,
                hidden_act="gelu_pytorch_tanh", embed_scale=24 ** 0.5, rms_norm_eps=1e-6)
    base.update(kw)
    return tiny_config(**base)


@st.composite
def tiny_gemma_configs(draw):
    """Random Gemma-shaped configs: pattern, window, heads, query scalar and the switches vary."""
    nh = draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(1, 4))
    return tiny_gemma_config(
        num_hidden_layers=n, num_attention_heads=nh, num_key_value_heads=draw(st.sampled_from([1, nh])),
        head_dim=draw(st.sampled_from([8, 16])), hidden_size=draw(st.sampled_from([16, 24])),
        layer_types=gemma3_pattern(n, draw(st.integers(1, 3))), sliding_window=draw(st.integers(1, 6)),
        query_pre_attn_scalar=draw(st.sampled_from([None, 8, 16, 20])),
        qk_norm=draw(st.booleans()), sandwich_norm=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()))


def gemma3_pattern(n: int, every: int) -> list[str]:
    from minfer.config import gemma3_layer_types
    return gemma3_layer_types(n, every)


@st.composite
def tiny_configs(draw, window=True, sharing=True):
    """Random small configs: MHA/GQA/MQA, tied or not, bias or not, window and sharing optional."""
    nh = draw(st.sampled_from([1, 2, 4]))
    nkv = draw(st.sampled_from([d for d in (1, 2, 4) if nh % d == 0]))
    hd = draw(st.sampled_from([8, 16]))
    return tiny_config(
        num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, hidden_size=nh * hd,
        num_hidden_layers=draw(st.integers(1, 3)),
        tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 8))) if window else None,
        kv_share_group=draw(st.integers(1, 2)) if sharing else 1,
    )


def tiny_model(cfg: ModelConfig, seed: int = 0):
    return build_model(cfg, seed=seed, dtype=torch.float32)


def describe_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """A useful message for a failed comparison: max error and where it is."""
    err = (a - b).abs()
    idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
    return f"max abs error {err.max().item():.3e} at index {idx}: {a[idx].item():.6f} vs {b[idx].item():.6f}"


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first differing position {i}: {x} vs {y}"
    return f"lengths differ: {len(a)} vs {len(b)}" if len(a) != len(b) else "identical"


def batch_of(mgr, chunks):
    """The engine runner's flattening of [(seq_id, start, n)] (token ids do not matter to attention)."""
    class Seq:
        def __init__(self, rid):
            self.request_id, self.all_token_ids = rid, [0] * mgr.num_tokens(rid)

    class Chunk:
        def __init__(self, rid, start, n):
            self.request, self.start, self.num_tokens = Seq(rid), start, n

    from minfer.engine.runner import prepare_batch
    return prepare_batch(mgr, [Chunk(*c) for c in chunks])[1]


def paged_pool(S, nkv, g, hd, bs, lens, device, dtype, seed):
    """A shuffled paged pool holding S sequences of the given lengths -> (q, k, v, block_tables, context_lens).

    q (S, nkv * g, hd); k, v (num_blocks, bs, nkv, hd); block_tables (S, max blocks) int32 rows of
    distinct random blocks; context_lens (S,) int32. For the paged decode kernels' tests.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(need) + 2
    k = torch.randn(num_blocks, bs, nkv, hd, generator=gen).to(device, dtype)
    v = torch.randn(num_blocks, bs, nkv, hd, generator=gen).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(max(need), 1)
    tables = torch.zeros(S, width, dtype=torch.int32)
    for s, m in enumerate(need):
        tables[s, :m] = torch.tensor([perm.pop() for _ in range(m)], dtype=torch.int32)
    q = torch.randn(S, nkv * g, hd, generator=gen).to(device, dtype)
    return q, k, v, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
