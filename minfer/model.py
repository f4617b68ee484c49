"""The transformer: a Llama-family decoder written to be read top to bottom.

    x = embed(ids)
    per layer:  x = x + attn(rms_norm(x));  x = x + mlp(rms_norm(x))
    logits = lm_head(rms_norm(x))

Gemma 3 is the same loop with ``ModelConfig``'s switches on. Attention goes through the KV
cache's ``update`` / ``attend`` (``minfer.kv.base``); HF names outside, fused ``qkv_proj`` /
``gate_up_proj`` inside. vLLM: ``vllm/model_executor/models/llama.py``. More: docs/architecture.md.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from minfer.attention import get_backend
from minfer.config import ModelConfig
from minfer.kv.base import NO_CACHE, KVCache, KVView

# --- RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, no mean shift ---
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32."""
    xf = x.float()                                                   # (..., d)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)                                   # HF casts back before scaling


def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (offset + weight), cast back only at the end
    (HF ``Gemma3RMSNorm``: weights are stored around 0 and the norm scales by 1 + w)."""
    xf = x.float()                                                   # (..., d)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (offset + weight.float())).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return rms_norm_offset(x, self.weight, self.eps, self.offset)
        return rms_norm(x, self.weight, self.eps)


# --- RoPE (Su et al. 2021): channels (i, i + hd/2) rotate by position * inv_freq[i] ---
# HF's "rotate half" layout; llama.cpp interleaves q/k rows (undone by checkpoints/gguf_import.py).
def rope_inv_freq(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """Per-pair rotation speeds (hd/2,), with Llama-3 / linear scaling when asked.
    ``theta`` overrides the base (Gemma's local layers: ``cfg.rope_local_base_freq``, no scaling)."""
    hd = cfg.head_dim
    base = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = (cfg.rope_scaling if theta is None else None) or {}       # an explicit base: no scaling
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: high frequencies as they are, low ones / factor, blended between (Meta's reference code)
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor,
                               torch.where(wavelen < old_ctx / high, inv_freq, blended))
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (use default, linear or llama3)")
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype=torch.float32):
    """cos and sin tables for the given positions, each (B, 1, T, hd): computed once per forward."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]                             # (B, 1, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, hd) by the tables (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)                           # "rotate half"
    return x * cos + rotated * sin


# --- Fused projections: q/k/v (gate/up) in one matmul, HF names on load and save (docs/architecture.md) ---
class StackedProjections(nn.Module):
    """Base of Attention and MLP: linears that read the same input, stacked into one when fused.
    ``parts`` maps each HF linear to its output rows, e.g. {"q_proj": 576, "k_proj": 192, "v_proj": 192};
    fused, one ``nn.Linear`` named ``fused_name`` stacks them on dim 0 (docs/architecture.md)."""

    def _add_projections(self, in_features: int, parts: dict[str, int], bias: bool,
                         fused_name: str, fused: bool) -> None:
        self.parts = dict(parts)
        self.fused_name = fused_name if fused and len(parts) > 1 else None
        if self.fused_name is None:
            for name, rows in parts.items():
                setattr(self, name, nn.Linear(in_features, rows, bias=bias))
            return
        setattr(self, fused_name, nn.Linear(in_features, sum(parts.values()), bias=bias))
        self.register_load_state_dict_pre_hook(_stack_on_load)
        self.register_state_dict_post_hook(_split_on_save)

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each part's output (..., rows), in order: views of ONE matmul's output when fused."""
        if self.fused_name is None:
            return [getattr(self, name)(x) for name in self.parts]
        return list(getattr(self, self.fused_name)(x).split(list(self.parts.values()), dim=-1))


def _stack_on_load(module, state_dict, prefix, *_):
    """Load pre-hook: ``{prefix}q_proj.X``, ``k_proj.X``, ``v_proj.X`` (X = weight, bias, qweight, scale, ...)
    -> ``{prefix}qkv_proj.X`` on dim 0; absent parts are left for ``load_state_dict`` to report."""
    first = f"{prefix}{next(iter(module.parts))}."
    for suffix in [k[len(first):] for k in state_dict if k.startswith(first)]:
        names = [f"{prefix}{part}.{suffix}" for part in module.parts]
        if not all(n in state_dict for n in names):
            continue
        tensors = [state_dict.pop(n) for n in names]
        for n, t, rows in zip(names, tensors, module.parts.values()):
            if t.shape[0] != rows or t.shape[1:] != tensors[0].shape[1:]:
                raise ValueError(f"{n} has shape {tuple(t.shape)}: it needs {rows} rows (output features) "
                                 f"and the shape {tuple(tensors[0].shape[1:])} after them to stack into "
                                 f"{prefix}{module.fused_name}")
        state_dict[f"{prefix}{module.fused_name}.{suffix}"] = torch.cat(tensors)


def _split_on_save(module, state_dict, prefix, _metadata):
    """State-dict post-hook: ``{prefix}qkv_proj.X`` -> ``q_proj.X``, ``k_proj.X``, ``v_proj.X``
    (views, no copy), put where the fused tensors were, part by part as HF orders them."""
    head = f"{prefix}{module.fused_name}."
    pieces = {k[len(head):]: v.split(list(module.parts.values())) for k, v in state_dict.items()
              if k.startswith(head)}
    items = list(state_dict.items())
    state_dict.clear()                                   # refilled in place: the caller holds this dict
    for key, value in items:
        if not key.startswith(head):
            state_dict[key] = value
        elif key == head + next(iter(pieces)):
            for i, part in enumerate(module.parts):
                for suffix, split in pieces.items():
                    state_dict[f"{prefix}{part}.{suffix}"] = split[i]


# --- Attention: projections + RoPE here, the softmax(QK^T)V part in a backend ---
class Attention(StackedProjections):
    def __init__(self, cfg: ModelConfig, layer_idx: int, fused: bool = True):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.kv_layer = cfg.kv_layer_of(layer_idx)
        self.owns_kv = cfg.owns_kv(layer_idx)
        nh, nkv, hd, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        # with cross-layer sharing only a group's first layer has K/V: the others have q_proj alone
        parts = {"q_proj": nh * hd, "k_proj": nkv * hd, "v_proj": nkv * hd} if self.owns_kv else {"q_proj": nh * hd}
        self._add_projections(h, parts, cfg.attention_bias, "qkv_proj", fused)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.window = cfg.window_of(layer_idx)                 # None: global layer
        if cfg.qk_norm:                                        # Gemma 3: per-head RMSNorm of q and k
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
        # backends scale scores by hd ** -0.5; Gemma asks for query_pre_attn_scalar ** -0.5 (HF
        # Gemma3Attention.scaling): folded into q, a no-op when the two are equal (Gemma 3 270M)
        s = cfg.query_pre_attn_scalar
        self.q_scale = 1.0 if s is None or s == hd else (hd / s) ** 0.5

    def forward(self, x, cos, sin, positions, kv_cache: KVCache, view: KVView | None, backend):
        """x (B, T, h) -> (B, T, h); also returns the ``KVView`` later layers of a sharing group reuse."""
        B, T, _ = x.shape
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, *kv = self.project(x)                                           # (B, T, nh*hd) [, 2 x (B, T, nkv*hd)]
        q = q.view(B, T, nh, hd)
        if cfg.qk_norm:
            q = self.q_norm(q)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q = apply_rope(q.transpose(1, 2), cos, sin)                       # (B, nh, T, hd)
        if self.owns_kv:      # write the new K/V; read back everything the queries may see
            k, v = (t.view(B, T, nkv, hd) for t in kv)                     # (B, T, nkv, hd) each
            k = self.k_norm(k) if cfg.qk_norm else k
            k, v = k.transpose(1, 2), v.transpose(1, 2)                    # (B, nkv, T, hd) each
            view = kv_cache.update(self.kv_layer, apply_rope(k, cos, sin), v, positions)
        out = kv_cache.attend(self.kv_layer, q, view, positions, backend, window=self.window)
        out = out.transpose(1, 2).reshape(B, T, nh * hd)                   # (B, T, nh * hd)
        return self.o_proj(out), view


class MLP(StackedProjections):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), gate and up in one ``gate_up_proj``.
    GeGLU (Gemma, ``hidden_act="gelu_pytorch_tanh"``): GELU's tanh approximation in place of silu."""

    def __init__(self, cfg: ModelConfig, fused: bool = True):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self._add_projections(h, {"gate_proj": f, "up_proj": f}, False, "gate_up_proj", fused)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.geglu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)                                         # (..., f) each
        act = F.gelu(gate, approximate="tanh") if self.geglu else F.silu(gate)
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    """Pre-norm block. With ``sandwich_norm`` (Gemma 2/3) the attention and MLP outputs are
    normalised too, and HF's names shift: ``post_attention_layernorm`` norms the attention output,
    ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` surround the MLP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, fused: bool = True):
        super().__init__()
        h, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = RMSNorm(h, eps, off)
        self.self_attn = Attention(cfg, layer_idx, fused)
        self.post_attention_layernorm = RMSNorm(h, eps, off)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, off)
            self.post_feedforward_layernorm = RMSNorm(h, eps, off)
        self.mlp = MLP(cfg, fused)

    fused = None  # float32 and a8 on the CPU: the same layer in two C++ calls (kernels/cpu_fused_layer.py)

    def forward(self, x, cos, sin, positions, kv_cache, view, backend):
        if self.fused is not None and (out := self.fused(x, cos, sin, positions, kv_cache, view, backend)):
            return out
        a, view = self.self_attn(self.input_layernorm(x), cos, sin, positions, kv_cache, view, backend)
        if not self.sandwich:
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x)), view
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, view


class _Body(nn.Module):
    """Holds the parameters under HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig, fused: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, fused) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Transformer(nn.Module):
    """A Llama-family causal LM; ``fuse_projections=False`` keeps q/k/v and gate/up as separate linears."""
    fused_head = None  # (model, x) -> one row's logits or None: set by kernels/cpu_fused_layer.py

    def __init__(self, cfg: ModelConfig, fuse_projections: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg, fuse_projections)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.rope_local_base_freq is not None:   # Gemma 3: local layers rotate with their own base
            self.register_buffer("inv_freq_local", rope_inv_freq(cfg, cfg.rope_local_base_freq), persistent=False)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., h) -> logits (..., vocab): the tied embedding or an ``lm_head`` in place."""
        if self.fused_head is not None and (out := self.fused_head(self, x)) is not None:
            return out                            # one row, float32 on the CPU (kernels/cpu_fused_layer.py)
        head = getattr(self, "lm_head", None)
        return head(x) if head is not None else F.linear(x, self.model.embed_tokens.weight)

    def forward(
        self,
        input_ids: torch.Tensor,          # (B, T) token ids
        positions: torch.Tensor,          # (B, T) absolute positions of those tokens
        kv_cache: KVCache | None = None,  # None: attend within input_ids only (see minfer.kv.base)
        attention: str | object = "sdpa",  # backend name or callable (see minfer.attention)
        last_only: bool = False,          # logits for the last position only (prefill, decode)
        logits_indices: torch.Tensor | None = None,  # (K,) positions along T whose logits are wanted
    ) -> torch.Tensor:
        """Logits (B, T, vocab); (B, 1, vocab) with ``last_only``; (B, K, vocab) with ``logits_indices``
        (a flattened serving batch needs only each sequence's last token: skip the LM head elsewhere)."""
        if input_ids.dim() != 2 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be (B, T); got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        backend = get_backend(attention) if isinstance(attention, str) else attention
        x = self.model.embed_tokens(input_ids)                            # (B, T, h)
        if self.cfg.embed_scale != 1.0:                                   # Gemma: times sqrt(hidden)
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = {None: rope_cos_sin(self.inv_freq, positions, x.dtype)}   # (B, 1, T, hd) each
        if hasattr(self, "inv_freq_local"):
            rope["local"] = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
        cache = NO_CACHE if kv_cache is None else kv_cache
        view = None
        for layer in self.model.layers:
            cos, sin = rope["local" if layer.self_attn.window is not None and "local" in rope else None]
            x, view = layer(x, cos, sin, positions, cache, view, backend)
        if last_only:
            x = x[:, -1:]
        elif logits_indices is not None:
            x = x[:, logits_indices]
        return self.compute_logits(self.model.norm(x))                    # (B, T, vocab)


def build_model(cfg: ModelConfig, state_dict: dict | None = None, *, device="cpu",
                dtype=torch.float32, seed: int | None = None, fuse_projections: bool = True) -> Transformer:
    """Create a Transformer; load ``state_dict`` (HF names) or initialise randomly with ``seed``: weights
    N(0, 0.02), norms near 1 (non-trivial logits), filled through the HF-named views, so a seed gives the
    same weights fused or not."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg, fuse_projections)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.rope_local_base_freq is not None:
        model.inv_freq_local = rope_inv_freq(cfg, cfg.rope_local_base_freq).to(device)
    if state_dict is None:
        with torch.no_grad():
            for name, p in model.state_dict().items():
                if "norm" in name:      # the norm's scale near 1: w near 1, or near 0 with Gemma's 1 + w
                    p.copy_(1.0 - cfg.norm_offset + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.02)
    else:
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype=dtype).eval().requires_grad_(False)
