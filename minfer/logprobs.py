"""Log-probabilities: of each sampled token and of each prompt token, with the k most likely beside it.

    logits (R, V) of the rows that asked --log_softmax--> (R, V) --gather the token--> its logprob, its rank
                                                                 \\--topk(k)--------> the k most likely
    -> one dict per row, vLLM's shape: {token_id: Logprob(logprob, rank, decoded_token)}, the token first

``logprobs_mode`` (vLLM's, ``vllm/v1/sample/sampler.py``): "raw_logprobs" (default) is the model's own
distribution; "processed_logprobs" the one the token was drawn from. Prompt logprobs are always raw.
Rank: 1 + the tokens strictly more likely. Only rows that ask pay. Why, the OpenAI shapes: docs/serving.md.
"""
from dataclasses import dataclass

import torch

from minfer.sampling import top_k_filter, top_p_filter

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass
class Logprob:
    """One token's entry (vLLM's ``vllm.logprobs.Logprob``)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def logprob_dicts(logits: torch.Tensor, token_ids: list[int], ks: list[int], decode=None) -> list[dict]:
    """logits (R, V), one token and one k per row -> R dicts: the token's entry, then the k most likely."""
    lp = torch.log_softmax(logits.float(), dim=-1)                          # (R, V)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device)[:, None])   # (R, 1)
    ranks, chosen = ((lp > chosen).sum(-1) + 1).tolist(), chosen[:, 0].tolist()   # (R,) each
    top = lp.topk(max(ks), dim=-1) if max(ks) else None                     # (R, kmax) sorted
    values, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    out = []
    for r, (tok, k) in enumerate(zip(token_ids, ks)):
        entries = [(tok, chosen[r], ranks[r])] + [(ids[r][j], values[r][j], j + 1) for j in range(k)]
        out.append({t: Logprob(v, rank, decode(t) if decode else None) for t, v, rank in entries})
    return out


def processed_logits(logits: torch.Tensor, params: list) -> torch.Tensor:
    """The logits each row's token is drawn from in ``sample_rows``: / temperature, top-k, top-p."""
    return torch.stack([x if p.greedy else top_p_filter(top_k_filter(x / p.temperature, p.top_k), p.top_p)
                        for x, p in zip(logits.float(), params)])


def record_sampled(logits: torch.Tensor, reqs: list, toks: list[int], mode: str, decode=None) -> None:
    """Append each asking request's new token entry to ``req.logprobs`` (rows of logits follow reqs)."""
    ask = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if not ask:
        return                                                              # nothing computed at all
    x = logits[torch.tensor(ask, device=logits.device)]                    # (A, V)
    if mode == "processed_logprobs":
        x = processed_logits(x, [reqs[i].params for i in ask])
    dicts = logprob_dicts(x, [toks[i] for i in ask], [reqs[i].params.logprobs for i in ask], decode)
    for i, d in zip(ask, dicts):
        reqs[i].logprobs.append(d)


def prompt_rows(chunks) -> tuple[list[int], list[tuple]]:
    """Rows of the flattened batch whose logits give missing prompt logprobs (row at position p predicts
    token p + 1; a recomputed chunk asks for nothing twice) -> (flat rows, [(request, first, count)])."""
    flat, spans, offset = [], [], 0
    for c in chunks:
        req, done = c.request, c.request.prompt_logprobs
        if done is not None:
            first, end = max(c.start, len(done) - 1), min(c.start + c.num_tokens, req.num_prompt_tokens - 1)
            if first < end:
                flat += range(offset + first - c.start, offset + end - c.start)
                spans.append((req, first, end - first))
        offset += c.num_tokens
    return flat, spans


def record_prompt(logits: torch.Tensor, spans: list[tuple], decode=None) -> None:
    """logits (P, V) of ``prompt_rows``' rows -> the entries appended to each ``req.prompt_logprobs``."""
    toks = [t for req, first, n in spans for t in req.prompt_token_ids[first + 1:first + 1 + n]]
    ks = [req.params.prompt_logprobs for req, _, n in spans for _ in range(n)]
    dicts, r = logprob_dicts(logits, toks, ks, decode), 0
    for req, _, n in spans:
        req.prompt_logprobs += dicts[r:r + n]
        r += n


# ---------------------------------------------------------------- the OpenAI shapes (docs/serving.md)
def _clamp(x: float) -> float:
    return max(x, -9999.0)                                                  # JSON has no -inf (vLLM's floor)


def completion_logprobs(ids: list[int], dicts: list, decode, offset: int = 0) -> dict:
    """/v1/completions' ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset (dicts[i] may be None)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, d in zip(ids, dicts):
        text = decode(tok)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if d is None else _clamp(d[tok].logprob))
        out["top_logprobs"].append(None if d is None else {decode(t): _clamp(e.logprob) for t, e in d.items()})
    return out


def chat_logprobs(ids: list[int], dicts: list, k: int, decode) -> dict:
    """/v1/chat/completions' ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: k of them}]}."""
    def entry(t, e):
        text = decode(t)
        return {"token": text, "logprob": _clamp(e.logprob), "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(tok, d[tok]), "top_logprobs": [
        entry(t, e) for t, e in sorted(d.items(), key=lambda te: te[1].rank) if e.rank <= k][:k]}
        for tok, d in zip(ids, dicts)]}
