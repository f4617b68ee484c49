"""Speculative decoding: more than one token per target forward, with exactly the target's output.

A method is picked by a spec string (``LLM(speculative=...)``): ``"prompt_lookup:k=8,max=4"``,
``"draft:layers-10,gamma=3"``, ``"lookahead:W=5,N=4,G=5"``, ``"medusa:<heads>"`` (docs/speculative.md).
vLLM: ``SpeculativeConfig`` (``vllm/config/speculative.py``).
"""
from dataclasses import dataclass
from typing import Iterator

from minfer.sampling import SamplingParams
from minfer.speculative.draft import DraftModelProposer, layer_skip_draft, quantized_draft
from minfer.speculative.lookahead import TreeAttentionCache, lookahead_generate, step_layout
from minfer.speculative.loop import speculative_generate
from minfer.speculative.prompt_lookup import PromptLookupProposer, ngram_propose
from minfer.speculative.rejection import (accept_reject, processed_probs, residual_distribution,
                                          verify_greedy, verify_sampled)
from minfer.speculative.stats import SpecStats, expected_tokens_per_step

METHODS = ("draft", "prompt_lookup", "lookahead", "medusa")
DEFAULT_TOKENS = {"draft": 4, "prompt_lookup": 8}   # num_speculative_tokens when not given

# option name in a spec string -> SpeculativeConfig field
_OPTIONS = {
    "draft": {"gamma": "num_speculative_tokens", "k": "num_speculative_tokens"},
    "prompt_lookup": {"k": "num_speculative_tokens", "min": "prompt_lookup_min",
                      "max": "prompt_lookup_max", "adaptive": "adaptive"},
    "lookahead": {"W": "window", "N": "ngram", "G": "max_candidates"},
    "medusa": {"nodes": "medusa_nodes", "depth": "medusa_depth"},
}


@dataclass
class SpeculativeConfig:
    """Which speculative method, and its knobs (vLLM names where vLLM has them)."""

    method: str                          # "draft" | "prompt_lookup" | "lookahead" | "medusa"
    draft_model: str | None = None       # draft: registry name / path, "int4", or "layers-K"; medusa: heads folder
    num_speculative_tokens: int | None = None  # gamma (draft, default 4) / k (prompt lookup, default 8)
    prompt_lookup_min: int = 2           # shortest suffix n-gram to look up
    prompt_lookup_max: int = 4           # longest suffix n-gram to look up
    adaptive: int = 1                    # prompt lookup: adapt the proposal length to recent acceptance (0 = fixed k)
    window: int = 4                      # lookahead W
    ngram: int = 3                       # lookahead N
    max_candidates: int = 4              # lookahead G
    medusa_nodes: int = 16               # medusa: the first N nodes of medusa.DEFAULT_TREE
    medusa_depth: int | None = None      # medusa: drop the nodes deeper than this (None: keep all)

    def __post_init__(self) -> None:
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_TOKENS.get(self.method, 4)
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        needs = {"draft": "a draft model: 'draft:<model>', 'draft:layers-K' or 'draft:int4'",
                 "medusa": "the heads folder: 'medusa:<path>'"}
        if self.method in needs and not self.draft_model:
            raise ValueError(f"speculative method {self.method!r} needs {needs[self.method]}")
        for name, lo in (("num_speculative_tokens", 1), ("prompt_lookup_min", 1), ("prompt_lookup_max", 1),
                         ("window", 1), ("ngram", 2), ("max_candidates", 1), ("medusa_nodes", 1),
                         ("medusa_depth", 1)):
            value = getattr(self, name)
            if (value is not None or name != "medusa_depth") and (not isinstance(value, int) or value < lo):
                raise ValueError(f"SpeculativeConfig.{name} must be an integer >= {lo}, got {value!r}")
        if self.adaptive not in (0, 1):
            raise ValueError(f"SpeculativeConfig.adaptive must be 0 or 1, got {self.adaptive!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"SpeculativeConfig.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, spec: "str | SpeculativeConfig") -> "SpeculativeConfig":
        """``"method[:arg][,key=value...]"`` -> SpeculativeConfig (see the module docstring)."""
        if isinstance(spec, SpeculativeConfig):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"speculative must be a non-empty string such as 'prompt_lookup', got {spec!r}")
        method, _, rest = spec.strip().partition(":")
        if method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {method!r} "
                             f"(in {spec!r})")
        parts = [s.strip() for s in rest.split(",") if s.strip()] if rest else []
        kw: dict = {}
        if method in ("draft", "medusa") and parts and "=" not in parts[0]:
            kw["draft_model"] = parts.pop(0)
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq or key.strip() not in _OPTIONS[method]:
                raise ValueError(f"unknown option {part!r} for speculative method {method!r}; "
                                 f"options: {', '.join(k + '=' for k in _OPTIONS[method])}")
            try:
                kw[_OPTIONS[method][key.strip()]] = int(value)
            except ValueError:
                raise ValueError(f"speculative option {key.strip()} must be an integer, got {value!r}") from None
        return cls(method=method, **kw)


def load_draft(target, spec: str, *, dtype=None, device=None):
    """The draft model for ``draft:<spec>``: "layers-K", "int4", or a checkpoint with the same vocab."""
    if spec.startswith("layers-"):
        if not spec[len("layers-"):].isdigit():
            raise ValueError(f"draft 'layers-K' needs an integer K, got {spec!r}")
        return layer_skip_draft(target, int(spec[len("layers-"):]))
    if spec == "int4":
        return quantized_draft(target, "int4")
    from minfer.loading import load_model

    weight = target.model.embed_tokens.weight
    cfg, draft, _ = load_model(spec, device=device or weight.device, dtype=dtype or weight.dtype)
    if cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft {spec!r} has vocab_size {cfg.vocab_size}, the target {target.cfg.vocab_size}: "
                         "a draft must share the target's tokenizer")
    return draft


def generate_speculative(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    config: SpeculativeConfig | str,
    *,
    draft=None,
    eos_token_ids: list[int] = (),
    kv_cache: str = "contiguous",
    attention: str = "sdpa",
    stats: SpecStats | None = None,
    metrics=None,
) -> Iterator[int]:
    """Like ``minfer.generate.generate_tokens``, with the speculative method in ``config``. ``draft``: the
    "draft" method's model (default ``load_draft(config.draft_model)``); ``stats`` collects acceptance."""
    config = SpeculativeConfig.parse(config)
    common = dict(eos_token_ids=eos_token_ids, attention=attention, stats=stats, metrics=metrics)
    if config.method in ("lookahead", "medusa") and kv_cache != "contiguous":
        raise ValueError(f"{config.method} decoding needs kv_cache='contiguous', got {kv_cache!r}")
    if config.method == "lookahead":
        return lookahead_generate(model, prompt_ids, params, window=config.window, ngram=config.ngram,
                                  max_candidates=config.max_candidates, **common)
    if config.method == "medusa":
        from minfer.speculative.medusa import DEFAULT_TREE, build_tree, load_heads, medusa_generate
        tree = build_tree(DEFAULT_TREE[:config.medusa_nodes], max_depth=config.medusa_depth)
        return medusa_generate(model, load_heads(config.draft_model), prompt_ids, params, tree=tree, **common)
    if config.method == "prompt_lookup":
        proposer = PromptLookupProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                                        adaptive=bool(config.adaptive))
    else:
        draft = draft if draft is not None else load_draft(model, config.draft_model)
        proposer = DraftModelProposer(draft, kv_cache=kv_cache, attention=attention,
                                      vocab_size=model.cfg.vocab_size)
    return speculative_generate(model, prompt_ids, params, proposer,
                                num_speculative_tokens=config.num_speculative_tokens,
                                kv_cache=kv_cache, **common)


__all__ = ["SpeculativeConfig", "generate_speculative", "load_draft", "SpecStats", "expected_tokens_per_step",
           "accept_reject", "residual_distribution", "processed_probs", "verify_greedy", "verify_sampled",
           "DraftModelProposer", "layer_skip_draft", "quantized_draft", "PromptLookupProposer",
           "ngram_propose", "lookahead_generate", "TreeAttentionCache", "step_layout", "speculative_generate"]
