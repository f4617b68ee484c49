"""Speculative decoding inside the engine step: every running request proposes, one forward verifies all
(each decode chunk widened by its proposal), ``num_computed_tokens`` rolls back. vLLM V1:
``vllm/v1/spec_decode/``, ``rejection_sampler.py``, ``gpu_model_runner.py`` (docs/speculative.md).
"""
import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from minfer.engine.llm_engine import LLMEngine, StepOutput
from minfer.engine.runner import prepare_batch
from minfer.engine.scheduler import ScheduledChunk
from minfer.guided import refuse_speculative
from minfer.sampling import sample_rows
from minfer.speculative import SpeculativeConfig, load_draft
from minfer.speculative.draft import DraftModelProposer
from minfer.speculative.loop import Proposer
from minfer.speculative.medusa import base_and_head_logits, last_hidden, load_heads
from minfer.speculative.prompt_lookup import PromptLookupProposer
from minfer.speculative.rejection import processed_probs, verify_greedy, verify_sampled
from minfer.speculative.stats import SpecStats


@dataclass
class Drafted:
    """A request seen with its proposal appended: what ``prepare_batch`` reads of a widened chunk."""

    request_id: str
    all_token_ids: list[int]


@dataclass
class HeadGuesses(Proposer):
    """Medusa as an engine proposer: the heads' top-1 guesses, read after each forward from the hidden
    state of the row that produced the request's newest token (one batched pass, in ``step``)."""

    num_tokens: int = -1                       # the sequence length the guesses were made for
    tokens: list[int] = field(default_factory=list)

    def propose(self, seq, k, params, generator):
        return (self.tokens[:k] if self.num_tokens == len(seq) else []), None   # made for this very sequence


class SpecDecodeEngine(LLMEngine):
    """``LLMEngine`` whose decode steps verify every running request's proposal in the one forward:
    ``from_model(model, tokenizer, speculative="prompt_lookup", ...)``; ``spec_stats[client id]``."""

    @classmethod
    def from_model(cls, model, tokenizer=None, *, speculative, draft=None, **engine_args) -> "SpecDecodeEngine":
        engine = super().from_model(model, tokenizer, **engine_args)
        engine.setup(model, SpeculativeConfig.parse(speculative), draft)
        return engine

    def setup(self, model, config: SpeculativeConfig, draft=None) -> None:
        if config.method == "lookahead":
            raise ValueError("lookahead decoding runs as a single-request loop (speculative.lookahead); "
                             "the engine verifies chains of proposals")
        self.model, self.spec = model, config
        self.proposers: dict[str, object] = {}
        self.spec_stats: dict[str, SpecStats] = {}
        self.medusa, self.draft, self.k = None, None, config.num_speculative_tokens
        if config.method == "draft":
            self.draft = draft if draft is not None else load_draft(model, config.draft_model)
        elif config.method == "medusa":
            self.medusa = load_heads(config.draft_model)
            self.k = min(self.medusa.num_heads, config.medusa_depth or self.medusa.num_heads)

    def _new_proposer(self, req):
        if self.spec.method == "prompt_lookup":
            p = PromptLookupProposer(self.spec.prompt_lookup_min, self.spec.prompt_lookup_max,
                                     adaptive=bool(self.spec.adaptive))
        elif self.spec.method == "draft":
            p = DraftModelProposer(self.draft, attention=self.runner.attention, vocab_size=self.runner.vocab_size)
        else:
            p = HeadGuesses()
        max_new = min(req.params.max_tokens, self.max_model_len - req.num_prompt_tokens)
        p.begin(list(req.prompt_token_ids), req.num_prompt_tokens + max_new)
        return p

    def add_request(self, prompt, params=None, request_id=None, arrival_time=None) -> str:
        if params is not None and params.n > 1:
            raise ValueError("speculative decoding samples one sequence per request; use n=1")
        refuse_speculative(params)
        if params is not None and (params.logprobs is not None or params.prompt_logprobs is not None):
            raise ValueError("SamplingParams.logprobs / prompt_logprobs are not available with speculative decoding")
        return super().add_request(prompt, params, request_id, arrival_time)

    def release(self, request_id: str):
        samples = super().release(request_id)
        if samples is not None:
            self.spec_stats.pop(request_id, None)
        return samples

    # ------------------------------------------------------------------ one step
    def _propose(self, chunks: list[ScheduledChunk]) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Chunk index -> (proposal, draft probabilities or None) for every decode chunk."""
        budget = self.config.max_num_batched_tokens - sum(c.num_tokens for c in chunks)
        out = {}
        for i, c in enumerate(chunks):
            req = c.request
            if c.num_tokens != 1 or req.num_output_tokens == 0 or req.num_computed_tokens != req.num_tokens:
                continue                                          # a prefill chunk
            if req.request_id not in self.proposers:
                self.proposers[req.request_id] = self._new_proposer(req)
            k = min(self.k, budget, req.params.max_tokens - req.num_output_tokens - 1,
                    self.max_model_len - req.num_tokens - 1)     # n + 1 tokens must still fit
            if k < 1 or not self.scheduler._reserve(req, c.start + 1 + k):   # k more slots, or no proposal
                out[i] = ([], None)
                continue
            draft, q = self.proposers[req.request_id].propose(req.all_token_ids, k, req.params, req.generator)
            draft = [int(t) for t in draft][:k]
            out[i] = (draft, None if q is None or not draft else q[:len(draft)])
            budget -= len(draft)
        return out

    @torch.no_grad()
    def _forward(self, chunks: list[ScheduledChunk], want: list[int]):
        """One forward over the flattened chunks -> (logits of rows ``want`` (R, V), hidden states or None)."""
        kv = self.runner.kv_manager
        input_ids, meta = prepare_batch(kv, chunks, self.runner.device)
        every = dataclasses.replace(meta, logits_indices=torch.arange(input_ids.shape[1], device=input_ids.device))
        with last_hidden(self.model) if self.medusa is not None else contextlib.nullcontext([]) as hidden:
            logits = self.runner.execute_model(input_ids, every, want, kv.take_pending_copies())
        return logits, (hidden[0][0] if hidden else None)

    def step(self) -> list[StepOutput]:
        """Schedule, propose, verify every proposal in one forward, emit the accepted tokens."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self.num_steps += 1
        proposals = self._propose(out.chunks)
        chunks, want, rows_of, end = [], [], {}, 0
        for i, c in enumerate(out.chunks):
            req, (draft, _) = c.request, proposals.get(i, ([], None))
            if draft:                                              # widen [x] -> [x d_1 .. d_k]
                c = ScheduledChunk(Drafted(req.request_id, req.all_token_ids + draft), c.start, 1 + len(draft))
            chunks.append(c)
            end += c.num_tokens
            if req.num_computed_tokens == req.num_tokens:         # it produces tokens this step
                rows_of[i] = list(range(end - 1 - len(draft), end))
                want += rows_of[i]
        logits, hidden = self._forward(chunks, want)
        emitted = self._verify(out.chunks, proposals, rows_of, logits, want)
        deltas, now, last_rows, medusa_reqs = [], self.clock(), [], []
        for i, toks in emitted.items():
            req, draft = out.chunks[i].request, proposals.get(i, ([], None))[0]
            for tok in toks:
                deltas.append(self._append_token(req, tok, now))
                if req.is_finished:
                    break
            if i in proposals:
                self.spec_stats.setdefault(req.client_id, SpecStats()).record(len(draft), len(toks) - 1)
            if not req.is_finished:
                req.num_computed_tokens = out.chunks[i].start + len(toks) if draft else req.num_computed_tokens
                if req.request_id in self.proposers:
                    self.proposers[req.request_id].accepted(req.all_token_ids)
                last_rows.append(rows_of[i][len(toks) - 1])
                medusa_reqs.append(req)
        self.scheduler.commit(out)
        if self.medusa is not None and last_rows:         # the heads read each request's newest row
            heads = self.medusa.to(hidden.device, hidden.dtype)
            logits = base_and_head_logits(self.model, heads, hidden[last_rows], self.k)[:, 1:]   # (R, k, V)
            for req, guess in zip(medusa_reqs, logits.argmax(-1).tolist()):
                p = self.proposers.setdefault(req.request_id, HeadGuesses())
                p.num_tokens, p.tokens = req.num_tokens, guess
        self._forget_finished()
        return deltas

    def _verify(self, chunks, proposals, rows_of, logits, want) -> dict[int, list[int]]:
        """Chunk index -> the tokens it emits: plain rows sampled together, proposals verified row by row."""
        at = {row: j for j, row in enumerate(want)}
        plain = [i for i in rows_of if not proposals.get(i, ([], None))[0]]
        out = {}
        if plain:
            reqs = [chunks[i].request for i in plain]
            toks = sample_rows(logits[[at[rows_of[i][-1]] for i in plain]], [r.params for r in reqs],
                               [r.generator for r in reqs]).tolist()
            out = {i: [t] for i, t in zip(plain, toks)}
        for i in rows_of:
            if i in out:
                continue
            req, (draft, q) = chunks[i].request, proposals[i]
            rows = logits[[at[r] for r in rows_of[i]]]                                # (k + 1, V)
            if req.params.greedy:
                out[i] = verify_greedy(rows.argmax(-1).tolist(), draft)
            else:
                out[i] = verify_sampled(processed_probs(rows, req.params), q, draft, req.generator)
        return dict(sorted(out.items()))

    def _forget_finished(self) -> None:
        for rid in [r for r in self.proposers if r not in self.requests or self.requests[r].is_finished]:
            del self.proposers[rid]
