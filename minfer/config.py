"""ModelConfig: one dataclass for every Llama-family model.

The field names follow HF transformers' ``LlamaConfig`` so that a
``config.json`` maps onto it almost one to one (see ``from_hf`` / ``to_hf``).
MHA, GQA and MQA are not separate options: they follow from the numbers.

    num_kv_heads == num_heads      -> multi-head attention (MHA)
    1 < num_kv_heads < num_heads   -> grouped-query attention (GQA)
    num_kv_heads == 1              -> multi-query attention (MQA)

Two fields are minfer's own teaching extensions (no pretrained checkpoint we
load uses them): ``kv_share_group`` (cross-layer KV sharing) and, for Llama
configs, ``sliding_window`` (Mistral/Gemma-style local attention).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


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
    model_type: str = "llama"            # "llama" or "qwen2" (decides the HF oracle class)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the field when the numbers do not fit together."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size",
                    "max_position_embeddings", "kv_share_group")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta}")

    # ------------------------------------------------------- derived numbers
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

    @property
    def attention_kind(self) -> str:
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_key_value_heads == 1 else "GQA"

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, hd = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * hd
        kv = 2 * h * self.num_key_value_heads * hd
        o = self.num_attention_heads * hd * h
        mlp = 3 * h * self.intermediate_size
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd if self.attention_bias else 0
        n_owners = self.num_kv_layers
        per_layer = q + o + mlp + 2 * h + bias
        total = self.num_hidden_layers * per_layer + n_owners * kv + h + self.vocab_size * h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total

    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (Llama, Mistral, Qwen2 families).

        Accepts both the older ``rope_theta`` / ``rope_scaling`` keys and the
        newer ``rope_parameters`` dict of transformers >= 5.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in kwargs and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or rope
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            kwargs["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
        else:
            kwargs.pop("rope_scaling", None)
        model_type = d.get("model_type", "llama")
        kwargs["model_type"] = model_type
        if model_type == "qwen2" and "attention_bias" not in d:
            kwargs["attention_bias"] = True      # Qwen2 always has q/k/v bias
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            kwargs.pop("sliding_window", None)
        for key in ("rope_theta", "rms_norm_eps"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict HF transformers reads back (LlamaForCausalLM / Qwen2ForCausalLM)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("extra")
        d.pop("kv_share_group")
        arch = "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
        d["architectures"] = [arch]
        d["hidden_act"] = "silu"
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            d["rope_scaling"] = dict(self.rope_scaling)
        d["rope_parameters"] = rope
        if d["sliding_window"] is None:
            d.pop("sliding_window")
        return d
