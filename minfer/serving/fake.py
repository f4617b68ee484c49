"""A fake model and a fake clock: test and teach the scheduler in milliseconds.
``FakeRunner`` (``engine.ModelRunner``'s interface, no weights) checks every context it reads
back through the block tables; its logits depend only on the context. ``FakeClock`` charges
``fixed + per_token * N`` per forward (docs/serving.md).
"""
import torch

from minfer.kv.block_pool import BlockPool, KVCacheManager


class FakeClock:
    """A clock that only moves when told to (``advance`` or ``sleep``)."""

    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"a clock cannot go back (dt={dt})")
        self.t += dt

    sleep = advance


class FakeRunner:
    """Stands in for ``ModelRunner``: checks the KV bookkeeping, returns context-hash logits. With a
    ``clock``, every ``execute`` advances it by ``step_fixed + step_per_token * N`` seconds."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 32, *,
                 enable_prefix_caching: bool = True, clock: FakeClock | None = None,
                 step_fixed: float = 0.010, step_per_token: float = 0.001, check_kv: bool = True):
        self.kv_manager = KVCacheManager(BlockPool(num_blocks, block_size, enable_prefix_caching))
        self.vocab_size = vocab_size
        self.slots: dict[int, tuple[int, int]] = {}     # slot -> (position, token) stored there
        self.clock, self.step_fixed, self.step_per_token = clock, step_fixed, step_per_token
        self.check_kv = check_kv                        # False: skip the read-back (fast simulations)
        self.num_forwards = 0
        self.batched_tokens: list[int] = []             # N of every forward, for the tests
        self.log: list[tuple[float, float, list[tuple[str, int, int]]]] = []   # (t0, t1, [(id, start, n)])

    @staticmethod
    def logits_for(context: list[int], vocab_size: int) -> torch.Tensor:
        """Deterministic 'logits' (V,) from the whole context: what the model 'predicts'."""
        g = torch.Generator().manual_seed(hash(tuple(context)) & 0x7FFFFFFF)
        return torch.randn(vocab_size, generator=g)

    def execute(self, chunks, sample_rows) -> torch.Tensor:
        if self.check_kv:
            self._check(chunks)
        out = [self.logits_for(c.request.all_token_ids[:c.start + c.num_tokens], self.vocab_size)
               for i, c in enumerate(chunks) if i in sample_rows]
        self._account(chunks)
        return torch.stack(out) if out else torch.empty(0, self.vocab_size)

    def _check(self, chunks) -> None:
        """Write the new tokens' "K/V" to their slots, then read each context back via the block tables."""
        mgr = self.kv_manager
        for c in chunks:
            req = c.request
            toks = req.all_token_ids[c.start:c.start + c.num_tokens]
            for pos, slot, tok in zip(range(c.start, c.start + c.num_tokens),
                                      mgr.slot_mapping(req.request_id, c.start, c.num_tokens), toks):
                self.slots[slot] = (pos, tok)
        for c in chunks:
            req = c.request
            end = c.start + c.num_tokens
            stored = [self.slots.get(s) for s in mgr.slot_mapping(req.request_id, 0, end)]
            want = list(enumerate(req.all_token_ids[:end]))
            if stored != want:
                bad = next(p for p, (a, b) in enumerate(zip(stored, want)) if a != b)
                raise AssertionError(f"KV cache corrupted for {req.request_id}: position {bad} holds "
                                     f"{stored[bad]}, expected {want[bad]}")

    def _account(self, chunks) -> None:
        """Count the forward, advance the fake clock by its cost, log who ran."""
        n = sum(c.num_tokens for c in chunks)
        self.num_forwards += 1
        self.batched_tokens.append(n)
        t0 = self.clock() if self.clock is not None else float(self.num_forwards - 1)
        if self.clock is not None:
            self.clock.advance(self.step_fixed + self.step_per_token * n)
        t1 = self.clock() if self.clock is not None else float(self.num_forwards)
        self.log.append((t0, t1, [(c.request.request_id, c.start, c.num_tokens) for c in chunks]))


def fake_generate(prompt: list[int], max_tokens: int, vocab_size: int, stop_token_ids=()) -> list[int]:
    """The outputs a request must get from ``FakeRunner`` with greedy sampling, computed alone."""
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        tok = int(torch.argmax(FakeRunner.logits_for(seq, vocab_size)))
        out.append(tok)
        seq.append(tok)
        if tok in stop_token_ids:
            break
    return out
