"""THE ORACLE. Generation by recomputing the whole sequence at every step.
No cache, no batching, no fused kernels: explicit softmax over an explicit mask, one head at a
time, O(n^2). It shares no code with ``minfer/model.py`` except the RoPE formula, so a bug
cannot hide in both; every optimization is tested against it (docs/architecture.md).
"""
import math

import torch

from minfer.config import ModelConfig
from minfer.model import rope_inv_freq
from minfer.sampling import SamplingParams, make_generator, sample


def _rmsnorm(x, w, eps, offset=0.0):
    return (offset + w) * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _gelu_tanh(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _rope(x, pos, inv_freq):
    """x (T, hd): rotate channel pairs (i, i + hd/2) by angle pos * inv_freq[i]."""
    half = x.shape[-1] // 2
    angle = pos[:, None].float() * inv_freq[None, :]                  # (T, hd/2)
    a, b = x[:, :half], x[:, half:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


def _causal_mask(T: int, window: int | None) -> torch.Tensor:
    """mask[i, j] = True when token i may look at token j."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    return mask


@torch.no_grad()
def naive_forward(weights: dict[str, torch.Tensor], cfg: ModelConfig, token_ids: list[int]) -> torch.Tensor:
    """Logits (T, vocab) for every position of `token_ids`, computed from scratch in fp32."""
    W = {k: v.float().cpu() for k, v in weights.items()}
    T, nh, nkv, hd = len(token_ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = nh // nkv
    pos = torch.arange(T)
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    scale = 1 / math.sqrt(cfg.query_pre_attn_scalar or hd)
    x = W["model.embed_tokens.weight"][torch.tensor(token_ids)] * cfg.embed_scale   # (T, h)

    def linear(name, inp):
        out = inp @ W[name + ".weight"].T
        return out + W[name + ".bias"] if name + ".bias" in W else out

    def heads(t, n, norm):                    # (T, n*hd) -> n x (T, hd), each RMS-normed if asked
        hs = [t[:, j * hd:(j + 1) * hd] for j in range(n)]
        return [_rmsnorm(a, W[norm], eps, off) for a in hs] if cfg.qk_norm else hs

    k_heads = v_heads = None
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        mask = _causal_mask(T, cfg.window_of(layer))                    # per layer: local or global
        inv_freq = rope_inv_freq(cfg, cfg.rope_theta_of(layer) if cfg.rope_local_base_freq else None)
        h = _rmsnorm(x, W[p + "input_layernorm.weight"], eps, off)
        q_heads = heads(linear(p + "self_attn.q_proj", h), nh, p + "self_attn.q_norm.weight")
        if cfg.owns_kv(layer):               # cross-layer sharing: later layers of a group reuse these
            k = linear(p + "self_attn.k_proj", h)                       # (T, nkv*hd)
            v = linear(p + "self_attn.v_proj", h)
            k_heads = [_rope(kh, pos, inv_freq) for kh in heads(k, nkv, p + "self_attn.k_norm.weight")]
            v_heads = [v[:, j * hd:(j + 1) * hd] for j in range(nkv)]
        outs = []
        for head in range(nh):
            qh = _rope(q_heads[head], pos, inv_freq)                    # (T, hd)
            kh, vh = k_heads[head // group], v_heads[head // group]
            scores = qh @ kh.T * scale                                  # (T, T)
            scores = torch.where(mask, scores, torch.tensor(float("-inf")))
            e = torch.exp(scores - scores.max(-1, keepdim=True).values)
            probs = e / e.sum(-1, keepdim=True)                         # explicit softmax
            outs.append(probs @ vh)                                     # (T, hd)
        a = linear(p + "self_attn.o_proj", torch.cat(outs, dim=-1))
        if cfg.sandwich_norm:                # Gemma: norm the attention output, then norms around the MLP
            x = x + _rmsnorm(a, W[p + "post_attention_layernorm.weight"], eps, off)
            h = _rmsnorm(x, W[p + "pre_feedforward_layernorm.weight"], eps, off)
        else:
            x = x + a
            h = _rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps, off)
        gate = linear(p + "mlp.gate_proj", h)
        act = _gelu_tanh(gate) if cfg.hidden_act == "gelu_pytorch_tanh" else gate * torch.sigmoid(gate)
        m = linear(p + "mlp.down_proj", act * linear(p + "mlp.up_proj", h))
        x = x + (_rmsnorm(m, W[p + "post_feedforward_layernorm.weight"], eps, off) if cfg.sandwich_norm else m)
    x = _rmsnorm(x, W["model.norm.weight"], eps, off)
    head = W["model.embed_tokens.weight"] if cfg.tie_word_embeddings else W["lm_head.weight"]
    return x @ head.T                                                   # (T, vocab)


@torch.no_grad()
def naive_generate(weights: dict[str, torch.Tensor], cfg: ModelConfig, prompt_ids: list[int],
                   params: SamplingParams, eos_token_ids: list[int] = ()) -> list[int]:
    """New token ids, recomputing the full sequence for every one of them."""
    ids = list(prompt_ids)
    gen = make_generator(params.seed)
    out: list[int] = []
    for _ in range(params.max_tokens):
        logits = naive_forward(weights, cfg, ids)[-1]                   # only the last row is used
        tok = sample(logits, params, gen)
        out.append(tok)
        ids.append(tok)
        if tok in params.stop_token_ids or (not params.ignore_eos and tok in eos_token_ids):
            break
    return out
