"""Sampling: turning logits into the next token.

    logits --/temperature--> --top-k--> --top-p--> softmax --> draw (seeded)

* temperature 0 means greedy: take the argmax, no randomness at all. So does any temperature
  below ``GREEDY_BELOW`` (1e-5, as vLLM's ``_SAMPLING_EPS``): dividing logits by 1e-40 would
  overflow float32 to inf, and inf - inf in the softmax gives NaN.
* top-k keeps the k largest logits (k = 0: off).
* top-p (nucleus, Holtzman et al. 2019) keeps the smallest set of most likely
  tokens whose probability mass reaches p.
* The draw uses the "exponential race": argmax(p_i / E_i) with E_i ~ Exp(1)
  is a sample from p. vLLM samples this way too
  (``vllm/v1/sample/ops/topk_topp_sampler.py``). Each request owns a
  ``torch.Generator``, so its tokens depend on its seed only, never on what
  else shares the batch. The noise is drawn on the CPU, so a seed gives the
  same tokens on CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minfer.devices import to_device
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
        if self.structured_outputs is not None or self.guided_json is not None or self.guided_regex is not None \
                or self.guided_choice is not None:
            from minfer.guided import check_guided
            check_guided(self)

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
    """Keep the smallest set of most likely tokens with mass >= top_p; others -> -inf.

    Sort descending; a token is dropped when the mass of the tokens *before* it
    already reaches top_p. The most likely token is therefore always kept.
    ``top_p`` is one float, or a (..., 1) tensor with one threshold per row.
    """
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

    The batch's sampler (vLLM's ``Sampler``, ``vllm/v1/sample/sampler.py``): a fixed number of
    batched ops whatever the mix of greedy and random rows, and no transfer to the host. The
    caller moves the K token ids to the host once per step (``.tolist()``): on a GPU that is
    the step's only sync.

    * Greedy rows: one argmax over every row (the first maximum wins ties).
    * Random rows: temperature, top-k and top-p as per-row tensors, one softmax, one race.
    * The race's noise E ~ Exp(1) is drawn **on the CPU**, from each request's own CPU
      generator (``make_generator``), then copied to the device without waiting. Why: a
      request's tokens then depend on its seed alone, not on the batch it shares (each
      row has its own generator) nor on the device (CPU and CUDA draw different streams
      from the same seed; with the CPU's, a seed gives the same tokens on both).

    Each row is computed exactly as it would be alone, so a request samples the same
    tokens in any batch (tested in tests/test_sampling.py).
    """
    K, V = logits.shape
    toks = logits.argmax(-1)                                          # (K,) the greedy answer of every row
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
