"""The record of one request's life: timestamps, and TTFT / TPOT / E2E with vLLM's definitions.
One record for every path; ``minfer.serving.metrics`` aggregates them. vLLM:
``RequestStateStats`` (``vllm/v1/metrics/stats.py``); the timeline: docs/architecture.md.
"""
from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Timestamps of one request (seconds, one clock) and the numbers derived from them."""

    arrival_time: float
    num_prompt_tokens: int = 0
    first_scheduled_time: float | None = None      # first time the scheduler gave it tokens
    token_times: list[float] = field(default_factory=list)   # when each output token came out
    finish_time: float | None = None
    num_preemptions: int = 0

    def record_token(self, now: float) -> None:
        """One output token left the engine at ``now``."""
        self.token_times.append(now)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def queueing_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if not self.token_times else self.token_times[0] - self.arrival_time

    @property
    def e2el(self) -> float | None:
        """End-to-end latency: arrival -> finish."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (n - 1); None for n <= 1 or an unfinished request."""
        return None if self.finish_time is None else tpot_from_timestamps(self.arrival_time, self.token_times)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """1 / TPOT: the decode speed the request saw."""
        return 1.0 / self.tpot if self.tpot else None

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies: the n - 1 gaps between consecutive tokens."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def tpot_from_timestamps(arrival_time: float, token_times: list[float]) -> float | None:
    """Time per output token: (E2E - TTFT) / (n - 1), the request finishing at its last token.
    The arrival cancels: TPOT is the mean gap between consecutive tokens. None if n < 2."""
    n = len(token_times)
    if n < 2:
        return None
    e2e = token_times[-1] - arrival_time
    ttft = token_times[0] - arrival_time
    return (e2e - ttft) / (n - 1)
