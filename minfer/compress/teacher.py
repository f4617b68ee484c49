"""Teacher-signal cache (`minfer teacher-cache`): run the big model ONCE over the corpus, keep per shard
``tokens``, ``topk_idx``, ``topk_logp`` (k most likely next tokens), ``hidden`` (the LM head's input) and
an optional ``loss_mask`` as .npy files, written atomically (a rerun resumes), read memory-mapped.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minfer.atomic import atomic_dir, write_json
from minfer.compress.common import DEFAULT_CACHE, log

FIELDS = ("tokens", "topk_idx", "topk_logp", "hidden")
OPTIONAL_FIELDS = ("loss_mask",)


@torch.no_grad()
def teacher_signals(model, tokens: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """tokens (B, T) -> top-k log-probs, their ids and the final hidden states, as numpy arrays."""
    from minfer.speculative.medusa import last_hidden
    B, T = tokens.shape
    pos = torch.arange(T)[None].expand(B, T)
    with last_hidden(model) as box:
        logits = model(tokens, pos).float()                       # (B, T, V)
    hidden = model.model.norm(box[0])                             # (B, T, h): the LM head's input
    logp = torch.log_softmax(logits, dim=-1)
    top = logp.topk(k, dim=-1)                                    # (B, T, k)
    return {"tokens": tokens.to(torch.int32).numpy(),
            "topk_idx": top.indices.to(torch.int32).numpy(),
            "topk_logp": top.values.to(torch.float16).numpy(),
            "hidden": hidden.to(torch.float16).numpy()}


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def build_teacher_cache(model, token_ids: list[int], out_dir: str | Path, *, seq_len: int = 256, k: int = 32,
                        shard_seqs: int = 16, batch: int = 4, meta: dict | None = None,
                        progress: bool = True, stop_after_shards: int | None = None,
                        loss_mask: list[int] | None = None) -> Path:
    """Cut ``token_ids`` into sequences of ``seq_len`` and cache the teacher's signals, shard by shard;
    complete shards are kept (the meta must match). ``stop_after_shards``: stop after that many new ones (a
    simulated kill). ``loss_mask``: one 0/1 per token, stored as the ``loss_mask`` field."""
    from tqdm.auto import tqdm

    if seq_len < 2 or k < 1 or shard_seqs < 1 or batch < 1:
        raise ValueError(f"seq_len >= 2, k >= 1, shard_seqs >= 1, batch >= 1 required; got "
                         f"{seq_len}, {k}, {shard_seqs}, {batch}")
    if k > model.cfg.vocab_size:
        raise ValueError(f"k ({k}) exceeds the vocabulary ({model.cfg.vocab_size})")
    if loss_mask is not None and len(loss_mask) != len(token_ids):
        raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(token_ids)} tokens")
    n_seq = len(token_ids) // seq_len
    if n_seq < 1:
        raise ValueError(f"{len(token_ids)} tokens is less than one sequence of seq_len={seq_len}")
    out = Path(out_dir)
    header = {"seq_len": seq_len, "k": k, "shard_seqs": shard_seqs, "num_seqs": n_seq,
              "hidden_size": model.cfg.hidden_size, "vocab_size": model.cfg.vocab_size,
              **({"loss_mask": True} if loss_mask is not None else {}), **(meta or {})}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != header:
            diff = {key: (old.get(key), header.get(key)) for key in set(old) | set(header) if old.get(key) != header.get(key)}
            raise ValueError(f"{out}: an existing cache with other settings {diff}; use another folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, header)
    ids = torch.tensor(token_ids[:n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)
    mask = (None if loss_mask is None                                               # (n_seq, seq_len)
            else np.asarray(loss_mask[:n_seq * seq_len], dtype=np.uint8).reshape(n_seq, seq_len))
    n_shards = -(-n_seq // shard_seqs)
    todo = [i for i in range(n_shards) if not (out / _shard_name(i)).is_dir()]
    with tqdm(total=n_seq * seq_len, initial=(n_shards - len(todo)) * shard_seqs * seq_len, unit="tok",
              unit_scale=True, desc="teacher cache", disable=not progress) as bar:
        for i in todo[:stop_after_shards]:
            rows = ids[i * shard_seqs:(i + 1) * shard_seqs]
            parts = [teacher_signals(model, rows[b:b + batch], k) for b in range(0, len(rows), batch)]
            with atomic_dir(out / _shard_name(i)) as tmp:
                for name in FIELDS:
                    np.save(tmp / f"{name}.npy", np.concatenate([p[name] for p in parts]))
                if mask is not None:
                    np.save(tmp / "loss_mask.npy", mask[i * shard_seqs:(i + 1) * shard_seqs])
            bar.update(rows.numel())
    return out


@dataclass
class Batch:
    tokens: torch.Tensor       # (B, T) long
    topk_idx: torch.Tensor     # (B, T, k) long
    topk_logp: torch.Tensor    # (B, T, k) float32
    hidden: torch.Tensor       # (B, T, h) float32
    loss_mask: torch.Tensor | None = None   # (B, T) bool, when the cache has one


class TeacherCache:
    """The shards of a cache folder, memory-mapped; ``len`` sequences, ``batch(rows)`` as tensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a teacher cache (run build_teacher_cache first)")
        self.meta = json.loads(meta_path.read_text())
        shards = sorted(p for p in self.folder.glob("shard_*") if p.is_dir())
        if not shards:
            raise FileNotFoundError(f"{self.folder}: the teacher cache has no shard yet")
        names = FIELDS + tuple(n for n in OPTIONAL_FIELDS if all((s / f"{n}.npy").is_file() for s in shards))
        self.arrays = {name: [np.load(s / f"{name}.npy", mmap_mode="r") for s in shards] for name in names}
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays["tokens"]])   # each shard's first row

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_tokens(self) -> int:
        return len(self) * self.meta["seq_len"]

    def _row(self, name: str, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.arrays[name][s][i - self.offsets[s]]

    def batch(self, rows) -> Batch:
        get = lambda name: np.stack([self._row(name, int(i)) for i in rows])  # noqa: E731
        mask = torch.from_numpy(get("loss_mask")).bool() if "loss_mask" in self.arrays else None
        return Batch(torch.from_numpy(get("tokens")).long(), torch.from_numpy(get("topk_idx")).long(),
                     torch.from_numpy(get("topk_logp")).float(), torch.from_numpy(get("hidden")).float(), mask)


# --- `minfer teacher-cache`: the train and held-out caches ---
def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args
    add_model_args(p)
    p.add_argument("--out", default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--tokens", type=int, default=120_000, help="training tokens to cache (default 120000)")
    p.add_argument("--heldout-tokens", type=int, default=16_384, help="held-out tokens to cache (default 16384)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=32, help="top-k teacher log-probs kept per token (default 32)")
    p.add_argument("--threads", type=int, default=1)


def main(args) -> int:
    """Build (or resume) the train and held-out teacher caches under --out/{train,heldout}."""
    from minfer.cli_args import set_threads
    from minfer.compress.corpus import split_fingerprint, token_stream
    from minfer.llm import LLM

    set_threads(args.threads)
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=False)
    eos = (llm.tokenizer.eos_token_ids or [None])[0]
    for split, n in (("heldout", args.heldout_tokens), ("train", args.tokens)):
        ids = token_stream(llm.tokenizer, split, n, eos)
        meta = {"model": str(args.model), "split": split, "corpus": split_fingerprint()}
        log(f"{split}: {len(ids)} tokens")
        build_teacher_cache(llm.model, ids, Path(args.out) / split, seq_len=args.seq_len, k=args.k, meta=meta)
    log(f"teacher cache in {args.out}")
    return 0
