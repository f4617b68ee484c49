"""A request inside the serving engine: its tokens, its progress, its own sampler.

One counter drives everything, as in vLLM V1 (``vllm/v1/request.py``): the tokens before
``num_computed_tokens`` have K/V in the cache, the rest are fed next; a decode is a request with
one uncomputed token (docs/architecture.md).
"""
import enum
from dataclasses import dataclass, field

import torch

from minfer.sampling import SamplingParams, make_generator, stop_token_ids
from minfer.metrics import RequestStats


@dataclass
class TraceRequest:
    """One request of a workload trace (``minfer.serving.workload``): when it arrives, what it asks."""
    request_id: str
    arrival_time: float             # seconds after the trace starts
    prompt_token_ids: list[int]
    max_tokens: int                 # tokens to generate (run with ignore_eos for exact lengths)
    prompt: str | None = None       # the text, when the prompt came from text


class RequestStatus(enum.Enum):
    WAITING = "waiting"              # not admitted yet (or preempted and waiting again)
    RUNNING = "running"              # holds KV blocks, gets tokens each step
    FINISHED_STOPPED = "stop"        # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"       # max_tokens or the model's context
    FINISHED_ABORTED = "abort"       # the client gave up

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    prompt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0          # tokens whose K/V are in the cache
    num_preemptions: int = 0
    text: str = ""                         # detokenized output (when the engine has a tokenizer)
    group_id: str | None = None           # the client's request id (None: this one's own)
    index: int = 0                         # which of the group's n parallel samples this is
    matcher: object = field(default=None, repr=False)   # guided decoding: the grammar's state (minfer/guided.py)
    stats: RequestStats = field(init=False)
    generator: torch.Generator = field(init=False, repr=False)
    logprobs: list | None = field(init=False, repr=False)          # one dict per output token (minfer/logprobs.py)
    prompt_logprobs: list | None = field(init=False, repr=False)   # one per prompt token; the first is None

    def __post_init__(self) -> None:
        self.stats = RequestStats(arrival_time=self.arrival_time, num_prompt_tokens=len(self.prompt_token_ids))
        self.logprobs = [] if self.params.logprobs is not None else None
        self.prompt_logprobs = [None] if self.params.prompt_logprobs is not None else None
        # One generator per request: its samples depend on its seed only, never on the batch.
        self.generator = make_generator(self.params.seed)

    @property
    def client_id(self) -> str:
        """The id the client knows: shared by the n samples of one request."""
        return self.group_id or self.request_id

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def stop_token_ids(self) -> set[int]:
        return stop_token_ids(self.params, self.eos_token_ids)
