"""Sampling: turning logits into the next token.

    logits --/temperature--> --top-k--> --top-p--> softmax --> draw (seeded)

Temperature below ``GREEDY_BELOW`` (vLLM's ``_SAMPLING_EPS``) is greedy; top-p is nucleus sampling
(Holtzman et al. 2019); the draw is the exponential race argmax(p_i / E_i), E_i ~ Exp(1), as in vLLM's
``vllm/v1/sample/ops/topk_topp_sampler.py``, from each request's own CPU generator (docs/architecture.md).
"""
from dataclasses import dataclass, field

import torch

from minfer.devices import to_device
from minfer.guided import check_guided
from minfer.validation import check_sampling_fields

GREEDY_BELOW = 1e-5                     # a temperature below this is greedy (stored as 0)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (names as in vLLM's ``SamplingParams``)."""

    temperature: float = 1.0            # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0                  # in (0, 1]; 1 = off
    top_k: int = 0                      # 0 = off
    max_tokens: int = 16                # new tokens at most
    stop: list[str] | str | None = None  # stop when the text contains one of these (not included)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False            # keep going past the end-of-sequence token
    seed: int | None = None             # per-request generator; None = nondeterministic
    n: int = 1                          # parallel samples per prompt
    logprobs: int | None = None         # each new token's logprob + the top k (minfer/logprobs.py)
    prompt_logprobs: int | None = None  # the same for each prompt token (no prefix-cache reuse then)
    # structured output (minfer/guided.py): at most one of a JSON schema, a regex, a list of choices
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict | None = None  # vLLM's newer shape: {"json" | "regex" | "choice" | "json_object": ...}

    def __post_init__(self) -> None:
        check_sampling_fields(vars(self))          # exact types, finite ranges (minfer/validation.py)
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        check_guided(self)                         # structured_outputs -> guided_*, at most one, it compiles

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf. logits (..., V)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]         # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the fewest most likely tokens with mass >= top_p (a float or (..., 1) per row); others -> -inf."""
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs                # (..., V)
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False                                       # the top token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pair_prompts(prompts, params) -> tuple[list, list]:
    """vLLM's ``generate`` convention: one prompt (text or token ids) or a list of them, and one
    SamplingParams for all or one per prompt -> (prompts, params) as two lists of equal length."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(params, (list, tuple)):
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
    return list(prompts), list(params)


def stop_token_ids(params: SamplingParams, eos_token_ids=()) -> set[int]:
    """The token ids that end a request: its stop ids, plus EOS unless ``ignore_eos``."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))


def finish_reason(tok: int, stop_ids, num_output: int, num_tokens: int, max_tokens: int,
                  max_model_len: int) -> str | None:
    """The one stop rule, after ``tok`` was appended: "stop" (a stop token: EOS unless ignored, or
    one of ``stop_token_ids``), "length" (``max_tokens`` new tokens, or the context is full), or None.
    Stop strings need the text and are applied on top by the output processor (``TextOutput``)."""
    if tok in stop_ids:
        return "stop"
    if num_output >= max_tokens or num_tokens >= max_model_len:
        return "length"
    return None


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Choose one token id from logits (V,) under `params`: ``sample_rows`` on a batch of one row."""
    return int(sample_rows(logits[None], [params], [generator])[0])     # None: a generator from params.seed


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of logits (K, V), row i under params[i] -> token ids (K,) on logits' device.
    The batch's sampler (vLLM's ``vllm/v1/sample/sampler.py``): one argmax for the greedy rows, per-row
    temperature/top-k/top-p tensors and one race for the others, no host transfer; the noise comes from
    each request's CPU generator, so a row samples as it would alone, on any device (docs/architecture.md)."""
    K, V = logits.shape
    toks = logits.float().argmax(-1)                                  # (K,) the greedy answer of every row
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if not rand:
        return toks
    dev = logits.device
    ps = [params[i] for i in rand]
    temp = to_device([[p.temperature] for p in ps], dev)             # (R, 1)
    x = logits.index_select(0, to_device(rand, dev, torch.long)).float() / temp   # (R, V)
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in ps]
    if any(ks):                                                       # top-k: drop below each row's k-th largest
        top = torch.topk(x, max(ks), dim=-1).values                   # (R, kmax) sorted, largest first
        kth = top.gather(1, to_device([[max(k, 1) - 1] for k in ks], dev, torch.long))   # (R, 1)
        kth = kth.masked_fill(to_device([[k == 0] for k in ks], dev), float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in ps):                               # top-p: as top_p_filter, per row
        top_p = to_device([[p.top_p if p.top_p < 1.0 else 2.0] for p in ps], dev)   # 2: keep all
        x = top_p_filter(x, top_p)
    probs = torch.softmax(x, dim=-1)                                  # (R, V)
    race = torch.stack([torch.empty(V).exponential_(1.0, generator=generators[i] if generators[i] is not None
                                                     else make_generator(params[i].seed)) for i in rand])
    picked = torch.argmax(probs / to_device(race, dev), dim=-1)       # (R,) argmax p_i / E_i
    return toks.index_copy(0, to_device(rand, dev, torch.long), picked)
