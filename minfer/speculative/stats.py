"""Acceptance statistics of one speculative request, and the theory (Leviathan et al. 2023, Eq. 1):
E[tokens / step] = (1 - a^(gamma + 1)) / (1 - a). vLLM: ``draft_acceptance_rate``."""
from collections import Counter
from dataclasses import dataclass, field


def expected_tokens_per_step(a: float, gamma: int) -> float:
    """(1 - a^(gamma+1)) / (1 - a): tokens per step for i.i.d. acceptance a and gamma proposals."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance a must lie in [0, 1], got {a}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if a == 1.0:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


@dataclass
class SpecStats:
    """What the verifier saw, one entry per target forward (verification step)."""

    proposed: list[int] = field(default_factory=list)   # k: tokens proposed at each step
    accepted: list[int] = field(default_factory=list)   # n: of those, how many were accepted

    def record(self, num_proposed: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"accepted ({num_accepted}) must lie in [0, proposed = {num_proposed}]")
        self.proposed.append(num_proposed)
        self.accepted.append(num_accepted)

    @property
    def num_steps(self) -> int:
        return len(self.proposed)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed over the whole request (None if nothing was proposed)."""
        total = sum(self.proposed)
        return sum(self.accepted) / total if total else None

    @property
    def per_token_acceptance(self) -> float | None:
        """Estimate of a: accepted / accept-reject decisions (a rejection ends a step's decisions)."""
        decisions = sum(n + (n < k) for k, n in zip(self.proposed, self.accepted))
        return sum(self.accepted) / decisions if decisions else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Mean tokens emitted per target forward: mean(n + 1)."""
        return (sum(self.accepted) + self.num_steps) / self.num_steps if self.num_steps else None

    def histogram(self) -> dict[int, int]:
        """{accepted count n: number of steps}, sorted by n."""
        return dict(sorted(Counter(self.accepted).items()))

    def expected_mean_length(self, a: float | None = None) -> float | None:
        """Theory for ``mean_accepted_length``: mean of (1 - a^(k+1)) / (1 - a); a measured unless given."""
        a = self.per_token_acceptance if a is None else a
        if a is None or not self.num_steps:
            return None
        return sum(expected_tokens_per_step(a, k) for k in self.proposed) / self.num_steps

    def summary(self) -> dict:
        return {"steps": self.num_steps, "proposed": sum(self.proposed), "accepted": sum(self.accepted),
                "acceptance_rate": self.acceptance_rate, "per_token_acceptance": self.per_token_acceptance,
                "mean_accepted_length": self.mean_accepted_length,
                "expected_mean_length": self.expected_mean_length(), "histogram": self.histogram()}
