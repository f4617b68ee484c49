"""Prefill/decode disaggregation (DistServe, Zhong et al. 2024): one ``LLMEngine`` prefills, another decodes.
A prefilled request (ids, token 1, sampler state, K/V blocks) is sent point to point and enters the
decode engine through ``add_prefilled_request``, as vLLM's KV connector (``kv_transfer/``).
"""
import queue
import threading
import time
from dataclasses import dataclass

import torch

from minfer.distributed import comm

KIND_DONE, KIND_TRANSFER, KIND_FINISHED = 0, 1, 2
PREFILL_RANK, DECODE_RANK = 0, 1


@dataclass
class PrefilledRequest:
    """What travels with the K/V blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: object
    arrival_time: float
    first_token: int
    first_token_time: float
    generator_state: torch.Tensor


# --- Prefill side ---
def prompt_kv(k: torch.Tensor, v: torch.Tensor, block_table: list[int], prompt_len: int):
    """The K/V blocks holding a prompt's first ``prompt_len`` tokens, out of pools (L, num_blocks, bs, nkv, hd)
    -> two (L, ceil(prompt_len / bs), bs, nkv, hd) tensors: whole blocks, as the block table lists them."""
    idx = torch.tensor(block_table[:-(-prompt_len // k.shape[2])], dtype=torch.long)
    return k[:, idx], v[:, idx]


def take_prefilled(engine, request_id: str, gather=prompt_kv) -> tuple[PrefilledRequest, torch.Tensor, torch.Tensor]:
    """What the prefill side ships for a request that just got its first token: (meta, K, V); then drop it here."""
    req = engine.requests[request_id]
    meta = PrefilledRequest(request_id, req.prompt_token_ids, req.params, req.arrival_time,
                            req.output_token_ids[0], req.stats.token_times[0], req.generator.get_state())
    k, v = gather(engine.runner.cache.k, engine.runner.cache.v,
                  engine.runner.kv_manager.block_table(request_id), req.num_prompt_tokens)
    engine.abort(request_id)
    return meta, k, v


def send_prefilled(engine, request_id: str, dst: int = DECODE_RANK) -> None:
    """Ship a request that just got its first token, then drop it here."""
    meta, k, v = take_prefilled(engine, request_id)
    comm.send(torch.tensor([KIND_TRANSFER, k.shape[1]]), dst)
    comm.send_object(meta, dst)
    comm.send(k, dst)                                                 # (L, n_blocks, bs, nkv, hd)
    comm.send(v, dst)


def prefill_worker(engine, trace, make_params, dst: int = DECODE_RANK, sleep=time.sleep) -> None:
    """Replay ``trace`` (``TraceRequest``s) on a prefill-only engine (``run_trace``); send each prompt on as
    it gets its first token (a request that finishes with it, as finished)."""
    from minfer.engine import run_trace

    def hand_off(d) -> None:
        req = engine.requests[d.request_id]
        if d.finished:                                    # done with one token: nothing to decode
            comm.send(torch.tensor([KIND_FINISHED, 0]), dst)
            comm.send_object((req.request_id, req.output_token_ids, req.arrival_time, req.stats.token_times,
                              req.finish_reason), dst)
        else:
            send_prefilled(engine, d.request_id, dst)
    engine.no_more_requests(True)
    run_trace(engine, trace, make_params, sleep, on_output=hand_off)
    comm.send(torch.tensor([KIND_DONE, 0]), dst)


# --- Decode side ---
def admit_prefilled(engine, meta: PrefilledRequest, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Put an already-prefilled request into ``engine`` as running; False if its pool is full now. ``k``,
    ``v`` (L, n_blocks, bs, nkv, hd): the prompt's blocks, copied in but for prefix-cache hits."""
    cache, bs = engine.runner.cache, engine.runner.kv_manager.block_size

    def load_kv(table: list[int], num_cached: int) -> None:
        fresh = list(range(num_cached // bs, len(table)))
        if fresh:
            dst = torch.tensor([table[i] for i in fresh])
            cache.k[:, dst] = k[:, fresh]
            cache.v[:, dst] = v[:, fresh]
    out = engine.add_prefilled_request(meta.prompt_token_ids, meta.params, meta.request_id, meta.arrival_time,
                                       meta.first_token, meta.first_token_time, load_kv, meta.generator_state)
    return out is not None


def _receive_all(engine, src: int, inbox: queue.Queue) -> None:
    """Background thread (transfers land while the engine steps, as a KV connector's): receive from the
    prefill worker and put on ``inbox`` in order. The only user of the decode side's process group."""
    cache = engine.runner.cache
    try:
        while True:
            kind, n_blocks = comm.recv(torch.empty(2, dtype=torch.long), src).tolist()
            if kind == KIND_DONE:
                inbox.put((KIND_DONE, None))
                return
            if kind == KIND_FINISHED:
                inbox.put((KIND_FINISHED, comm.recv_object(src)))
                continue
            meta = comm.recv_object(src)
            shape = (cache.k.shape[0], n_blocks, *cache.k.shape[2:])      # (L, n_blocks, bs, nkv, hd)
            kv = [comm.recv(torch.empty(shape, dtype=cache.k.dtype), src) for _ in range(2)]
            inbox.put((KIND_TRANSFER, (meta, *kv)))
    except comm.DistributedError as e:
        inbox.put((None, e))


def decode_worker(engine, src: int = PREFILL_RANK) -> dict:
    """Admit what the prefill worker sends, decode until it says done and all have finished
    -> {request_id: (output token ids, arrival time, token times, finish reason)}."""
    inbox: queue.Queue = queue.Queue()
    receiver = threading.Thread(target=_receive_all, args=(engine, src, inbox), daemon=True)
    receiver.start()
    finished, waiting, done = {}, [], False
    while True:
        idle = not (engine.has_unfinished_requests() or waiting)
        while not done:
            try:                                  # wait for news only when there is nothing to step
                kind, item = inbox.get(block=idle, timeout=comm.DEFAULT_TIMEOUT_S if idle else None)
            except queue.Empty:
                if idle:
                    raise comm.DistributedError("decode worker: no word from the prefill worker "
                                                f"in {comm.DEFAULT_TIMEOUT_S:.0f} s") from None
                break
            idle = False
            if kind is None:
                raise item
            if kind == KIND_DONE:
                done = True
            elif kind == KIND_FINISHED:                     # (request id, tokens, arrival, times, reason)
                finished[item[0]] = tuple(item[1:])
            else:
                waiting.append(item)
        waiting = [w for w in waiting if not admit_prefilled(engine, *w)]
        if engine.has_unfinished_requests():
            engine.step()
        elif done and not waiting:
            break
    receiver.join()
    for rid, req in engine.requests.items():
        finished[rid] = (req.output_token_ids, req.arrival_time, req.stats.token_times, req.finish_reason)
    return finished


