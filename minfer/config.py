"""ModelConfig: one dataclass for the Llama family and Gemma 3, with HF ``LlamaConfig``'s names.
Gemma 3's switches (``layer_types``, ``qk_norm``, ``sandwich_norm``, ...) default to Llama's
behaviour (HF ``models/gemma3/``, llama.cpp ``src/models/gemma3.cpp``); each: docs/architecture.md.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from minfer.validation import check_bool, check_int, check_real, is_int


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None          # None -> hidden_size // num_attention_heads
    intermediate_size: int = 1536        # SwiGLU inner width
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # Llama-3 style {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True     # LM head shares the embedding matrix
    attention_bias: bool = False         # q/k/v projections with bias (Qwen2)
    max_position_embeddings: int = 8192  # the context length
    sliding_window: int | None = None    # attend to the last W positions only
    kv_share_group: int = 1              # cross-layer KV: g adjacent layers share one K/V
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"            # "llama", "qwen2" or "gemma3_text" (decides the HF oracle class)
    layer_types: list[str] | None = None  # per layer "sliding_attention" / "full_attention"; None: all alike
    rope_local_base_freq: float | None = None    # RoPE base of sliding-window layers (None: rope_theta)
    query_pre_attn_scalar: int | None = None     # scores * scalar ** -0.5 (None: head_dim ** -0.5)
    qk_norm: bool = False                # RMSNorm on each head's q and k before RoPE
    sandwich_norm: bool = False          # also normalise the attention and MLP outputs
    norm_offset: float = 0.0             # RMSNorm multiplies by (norm_offset + weight)
    hidden_act: str = "silu"             # gated MLP activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    embed_scale: float = 1.0             # token embeddings are multiplied by this
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_sizes()                  # before any arithmetic on them (heads = 0 would divide by 0)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}), or give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # Far above any real model, low enough that a hostile config is refused before any allocation.
    LIMITS = {"vocab_size": 2**24, "hidden_size": 2**17, "num_hidden_layers": 1024, "num_attention_heads": 1024,
              "num_key_value_heads": 1024, "head_dim": 2**12, "intermediate_size": 2**19,
              "max_position_embeddings": 2**32, "kv_share_group": 1024}

    def _check_sizes(self) -> None:
        for name, hi in self.LIMITS.items():
            if name == "head_dim" and self.head_dim is None:
                continue
            check_int(getattr(self, name), f"ModelConfig.{name}", lo=1, hi=hi)

    def validate(self) -> None:
        """Raise ValueError naming the field when the numbers do not fit together."""
        self._check_sizes()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None:
            check_int(self.sliding_window, "ModelConfig.sliding_window (or None)", lo=1)
        check_real(self.rope_theta, "ModelConfig.rope_theta", "a finite number > 1", lambda x: x > 1)
        check_real(self.rms_norm_eps, "ModelConfig.rms_norm_eps", "a finite number in (0, 1)", lambda x: 0 < x < 1)
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm", "sandwich_norm"):
            check_bool(getattr(self, name), f"ModelConfig.{name}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, (list, tuple)) else [] if v is None else [v]
            if not all(is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"ModelConfig.{name} must be a token id (or a list of them) in "
                                 f"[0, {self.vocab_size}), got {v!r}")
        if not isinstance(self.model_type, str):
            raise ValueError(f"ModelConfig.model_type must be a string, got {self.model_type!r}")
        self._check_rope_scaling()
        self._check_gemma_fields()

    LAYER_TYPES = ("sliding_attention", "full_attention")
    ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

    def _check_gemma_fields(self) -> None:
        lt = self.layer_types
        if lt is not None:
            if not isinstance(lt, (list, tuple)) or len(lt) != self.num_hidden_layers or \
                    any(t not in self.LAYER_TYPES for t in lt):
                raise ValueError(f"ModelConfig.layer_types must list {self.num_hidden_layers} entries, each "
                                 f"'sliding_attention' or 'full_attention'; got {lt!r:.200}")
            if "sliding_attention" in lt and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types has sliding_attention layers: set sliding_window")
        if self.rope_local_base_freq is not None:
            check_real(self.rope_local_base_freq, "ModelConfig.rope_local_base_freq", "a finite number > 1 "
                       "(or None)", lambda x: x > 1)
        if self.query_pre_attn_scalar is not None:
            check_int(self.query_pre_attn_scalar, "ModelConfig.query_pre_attn_scalar (or None)", lo=1)
        check_real(self.norm_offset, "ModelConfig.norm_offset", "0 or 1", lambda x: x in (0, 1))
        check_real(self.embed_scale, "ModelConfig.embed_scale", "a finite number > 0", lambda x: x > 0)
        if self.hidden_act not in self.ACTIVATIONS:
            raise ValueError(f"ModelConfig.hidden_act must be one of {', '.join(self.ACTIVATIONS)}, "
                             f"got {self.hidden_act!r:.80}")

    def _check_rope_scaling(self) -> None:
        s = self.rope_scaling
        if s is None:
            return
        if not isinstance(s, dict):
            raise ValueError(f"ModelConfig.rope_scaling must be an object or null, got {s!r}")
        kind = s.get("rope_type", s.get("type", "default"))
        need = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        if kind not in need:
            raise ValueError(f"ModelConfig.rope_scaling type {kind!r} is not supported (use default, linear "
                             f"or llama3)")
        for key in need[kind]:
            check_real(s.get(key), f"ModelConfig.rope_scaling.{key}", "a finite number > 0", lambda x: x > 0)
        if kind == "llama3" and s["high_freq_factor"] == s["low_freq_factor"]:
            raise ValueError("ModelConfig.rope_scaling: high_freq_factor must differ from low_freq_factor")

    # --- derived numbers ---
    @property
    def num_kv_layers(self) -> int:
        """Layers that own a K/V cache (fewer than num_hidden_layers with cross-layer sharing)."""
        return math.ceil(self.num_hidden_layers / self.kv_share_group)

    def kv_layer_of(self, layer: int) -> int:
        """Index of the KV cache slot layer `layer` reads (and writes, if it is the group's first)."""
        return layer // self.kv_share_group

    def owns_kv(self, layer: int) -> bool:
        """True if this layer computes K and V itself (the first layer of its sharing group)."""
        return layer % self.kv_share_group == 0

    def window_of(self, layer: int) -> int | None:
        """The attention window of ``layer``: ``sliding_window`` for a local layer, None for a global one."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope_theta_of(self, layer: int) -> float:
        """RoPE base of ``layer``: ``rope_local_base_freq`` on sliding-window layers when set."""
        if self.rope_local_base_freq is not None and self.window_of(layer) is not None:
            return self.rope_local_base_freq
        return self.rope_theta

    @property
    def is_hybrid(self) -> bool:
        """Some layers local (windowed), others global (Gemma 3: 5 local : 1 global)."""
        return len({self.window_of(i) for i in range(self.num_hidden_layers)}) > 1

    @property
    def attention_kind(self) -> str:
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_key_value_heads == 1 else "GQA"

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, hd = self.hidden_size, self.head_dim
        q_and_o = 2 * h * self.num_attention_heads * hd
        kv = 2 * h * self.num_key_value_heads * hd
        mlp = 3 * h * self.intermediate_size
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd if self.attention_bias else 0
        norms = (4 if self.sandwich_norm else 2) * h + (2 * hd if self.qk_norm else 0)
        per_layer = q_and_o + mlp + norms + bias
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * h
        return self.num_hidden_layers * per_layer + self.num_kv_layers * kv + h + embeddings

    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # --- HF config.json ---
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (Llama, Mistral, Qwen2, Gemma 3), with the older
        ``rope_theta`` / ``rope_scaling`` keys or transformers 5's ``rope_parameters``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        rope = d.get("rope_parameters") or {}
        for key in ("rope_parameters", "rope_scaling"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(f"{key} must be an object or null, got {d[key]!r:.80}")
        if "rope_theta" not in kwargs and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or rope
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            kwargs["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
        else:
            kwargs.pop("rope_scaling", None)
        kwargs["model_type"] = model_type = d.get("model_type", "llama")
        if model_type == "qwen2" and "attention_bias" not in d:
            kwargs["attention_bias"] = True      # Qwen2 always has q/k/v bias
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            kwargs.pop("sliding_window", None)
        if model_type == "gemma3_text":
            kwargs.update(_gemma3_from_hf(d))
        for key in ("rope_theta", "rms_norm_eps"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict HF transformers reads back (LlamaForCausalLM / Qwen2ForCausalLM)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("extra", "kv_share_group")}
        if self.model_type == "gemma3_text":
            return _gemma3_to_hf(self, d)
        defaults = ModelConfig.__dataclass_fields__
        for name in GEMMA_FIELDS:                # at their defaults they say nothing to HF Llama / Qwen2
            if d[name] == defaults[name].default:
                d.pop(name)
        arch = "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
        d["architectures"] = [arch]
        d["hidden_act"] = self.hidden_act
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            d["rope_scaling"] = dict(self.rope_scaling)
        d["rope_parameters"] = rope
        if d["sliding_window"] is None:
            d.pop("sliding_window")
        return d


# --- Gemma 3 <-> HF Gemma3TextConfig ---
GEMMA_FIELDS = ("layer_types", "rope_local_base_freq", "query_pre_attn_scalar", "qk_norm", "sandwich_norm",
                "norm_offset", "hidden_act", "embed_scale")


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Every ``pattern``-th layer global, the others local: HF ``Gemma3TextConfig.__post_init__``
    (``sliding_window_pattern`` 6); llama.cpp ``hparams.set_swa_pattern(6)`` for LLM_ARCH_GEMMA3."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def _gemma3_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 3 fields of an HF ``gemma3_text`` config.json (transformers 5 ``rope_parameters``
    per layer type, or the older ``rope_theta`` / ``rope_local_base_freq``)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(key) is not None:
            raise ValueError(f"config.json: {key} is not supported (Gemma 3 has none)")
    rope = d.get("rope_parameters") or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    return {
        "rope_theta": float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
        "rope_local_base_freq": float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))),
        "layer_types": d.get("layer_types") or gemma3_layer_types(d["num_hidden_layers"]),
        "sliding_window": d.get("sliding_window", 4096),
        "query_pre_attn_scalar": d.get("query_pre_attn_scalar", 256),
        "hidden_act": d.get("hidden_activation", "gelu_pytorch_tanh"),
        "qk_norm": True, "sandwich_norm": True, "norm_offset": 1.0,
        "embed_scale": float(d["hidden_size"]) ** 0.5,
    }


def _gemma3_to_hf(cfg: ModelConfig, d: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` -> HF ``Gemma3TextConfig`` keys (Gemma3ForCausalLM reads them back)."""
    for name in GEMMA_FIELDS + ("rope_theta", "rope_scaling"):
        d.pop(name)
    d.update(architectures=["Gemma3ForCausalLM"], hidden_activation=cfg.hidden_act,
             layer_types=list(cfg.layer_types or gemma3_layer_types(cfg.num_hidden_layers)),
             query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
             rope_parameters={
                 "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                 "sliding_attention": {"rope_type": "default",
                                       "rope_theta": cfg.rope_local_base_freq or cfg.rope_theta}})
    return d
