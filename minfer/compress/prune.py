"""Structured pruning (whole FFN channels, whole query heads) + healing by distillation.

Unstructured pruning zeroes single weights: the matrices keep their shape, and a
dense kernel reads the zeros anyway, so nothing gets faster (shown side by side).
Structured pruning removes whole rows/columns, so the matrices really shrink:

    FFN channel c of a layer = row c of gate_proj and up_proj + column c of down_proj
    query head i             = its hd rows of q_proj + its hd columns of o_proj
                               (the same number per K/V group, so GQA stays regular)

Which ones go: an activation-aware score on calibration text (training text only),
in the spirit of Wanda (Sun et al. 2024: |weight| x input norm) and LLM-Pruner (Ma et
al. 2023: structural groups):

    FFN channel c   mean_t |silu(gate_c(x_t)) * up_c(x_t)|  x  ||down_proj[:, c]||
    head i          mean_t || o_proj[:, head i] @ attn_out_i(x_t) ||

the average size of what the channel / head adds to the residual stream. Every
layer loses the same fraction (one ``intermediate_size`` in the config, so the
pruned model is an ordinary HF Llama folder). Then the pruned model is healed by
distillation from the unpruned teacher (``distill.train`` on the teacher cache).
Sheared-LLaMA (Xia et al. 2024) and NVIDIA's Minitron prune and distill this way.
``minfer prune`` (``minfer/bench/prune.py``) prunes, heals and measures the result.
"""
from __future__ import annotations

import dataclasses

import torch

from minfer.model import build_model


@torch.no_grad()
def importance(model, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: FFN channel scores (f,) and query head scores (nh,), from calibration tokens (B, T)."""
    cfg = model.cfg
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    ffn_act = [torch.zeros(cfg.intermediate_size) for _ in model.model.layers]
    head_out = [torch.zeros(nh) for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        def ffn_hook(_m, inp, _out, i=i):
            a = inp[0].float().reshape(-1, inp[0].shape[-1])                 # (N, f)
            ffn_act[i] += a.abs().sum(0)
        def o_hook(m, inp, _out, i=i):
            a = inp[0].float().reshape(-1, nh, hd)                            # (N, nh, hd)
            W = m.weight.float().view(-1, nh, hd)                             # (h, nh, hd)
            head_out[i] += torch.einsum("nid,hid->nih", a, W).norm(dim=-1).sum(0)  # (nh,)
        handles.append(layer.mlp.down_proj.register_forward_hook(ffn_hook))
        handles.append(layer.self_attn.o_proj.register_forward_hook(o_hook))
    try:
        B, T = calib.shape
        model(calib, torch.arange(T)[None].expand(B, T))
    finally:
        for h in handles:
            h.remove()
    ffn = [act * layer.mlp.down_proj.weight.float().norm(dim=0) for act, layer in zip(ffn_act, model.model.layers)]
    return ffn, head_out


def choose(ffn_scores, head_scores, cfg, ffn_ratio: float, heads_per_group: int = 0):
    """Indices to KEEP per layer: the top (1 - ffn_ratio) channels, and all but ``heads_per_group`` heads per group."""
    if not 0.0 <= ffn_ratio < 1.0:
        raise ValueError(f"ffn_ratio must lie in [0, 1), got {ffn_ratio}")
    G = (cfg.num_attention_heads // cfg.num_key_value_heads)
    if not 0 <= heads_per_group < G:
        raise ValueError(f"heads_per_group must lie in [0, {G - 1}] (query heads per K/V head: {G}), got {heads_per_group}")
    keep_f = cfg.intermediate_size - int(round(ffn_ratio * cfg.intermediate_size))
    ffn_keep = [s.topk(keep_f).indices.sort().values for s in ffn_scores]
    head_keep = []
    for s in head_scores:
        groups = s.view(cfg.num_key_value_heads, G)                               # query heads of each K/V head
        top = groups.topk(G - heads_per_group, dim=1).indices.sort(dim=1).values  # (nkv, G - drop)
        head_keep.append((top + torch.arange(cfg.num_key_value_heads)[:, None] * G).flatten())
    return ffn_keep, head_keep


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)).flatten()


def prune_state(model, ffn_keep, head_keep):
    """-> (smaller config, state dict) with only the kept FFN channels and query heads."""
    cfg = model.cfg
    hd = cfg.head_dim
    new_cfg = dataclasses.replace(cfg, intermediate_size=len(ffn_keep[0]),
                                  num_attention_heads=len(head_keep[0]), head_dim=hd, extra={})
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    for i, (f, h) in enumerate(zip(ffn_keep, head_keep)):
        p = f"model.layers.{i}."
        for name in ("gate_proj", "up_proj"):
            sd[p + f"mlp.{name}.weight"] = sd[p + f"mlp.{name}.weight"][f]
        sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, f]
        rows = _head_rows(h, hd)
        sd[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][rows]
        if p + "self_attn.q_proj.bias" in sd:
            sd[p + "self_attn.q_proj.bias"] = sd[p + "self_attn.q_proj.bias"][rows]
        sd[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, rows]
    return new_cfg, sd


def unprune_state(pruned_sd, cfg, ffn_keep, head_keep):
    """Put a pruned state dict back at full size: kept rows/columns in place, zeros elsewhere."""
    hd = cfg.head_dim
    sd = dict(pruned_sd)
    for i, (f, h) in enumerate(zip(ffn_keep, head_keep)):
        p = f"model.layers.{i}."
        rows = _head_rows(h, hd)
        for name, dim, idx, full in (("mlp.gate_proj.weight", 0, f, cfg.intermediate_size),
                                     ("mlp.up_proj.weight", 0, f, cfg.intermediate_size),
                                     ("mlp.down_proj.weight", 1, f, cfg.intermediate_size),
                                     ("self_attn.q_proj.weight", 0, rows, cfg.num_attention_heads * hd),
                                     ("self_attn.q_proj.bias", 0, rows, cfg.num_attention_heads * hd),
                                     ("self_attn.o_proj.weight", 1, rows, cfg.num_attention_heads * hd)):
            if p + name not in sd:
                continue
            t = sd[p + name]
            shape = list(t.shape)
            shape[dim] = full
            out = t.new_zeros(shape)
            out.index_copy_(dim, idx, t)
            sd[p + name] = out
    return sd


def prune_model(model, calib: torch.Tensor, ffn_ratio: float, heads_per_group: int = 0):
    """Score on ``calib``, keep the best, return (pruned Transformer, (ffn_keep, head_keep))."""
    ffn_s, head_s = importance(model, calib)
    keep = choose(ffn_s, head_s, model.cfg, ffn_ratio, heads_per_group)
    cfg, sd = prune_state(model, *keep)
    return build_model(cfg, sd, dtype=model.model.embed_tokens.weight.dtype), keep


@torch.no_grad()
def magnitude_sparsify(model, ratio: float):
    """Unstructured baseline: zero the smallest |w| of every FFN matrix in place (shapes unchanged)."""
    from minfer.kernels.onednn_linear import unpack_linears
    unpack_linears(model)                      # a prepacked copy would keep the old weights
    for layer in model.model.layers:
        for w in layer.mlp.state_dict().values():      # gate, up, down: views into the fused weights
            k = int(ratio * w.numel())
            if k:
                cut = w.abs().flatten().kthvalue(k).values
                w.masked_fill_(w.abs() <= cut, 0.0)
    return model
<<<<<<< HEAD


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minfer.cli_args import add_model_args
    add_model_args(p)
    p.add_argument("--cache", default="weights/compress/teacher")
    p.add_argument("--ffn-ratios", default="0.25,0.5", help="fractions of FFN channels to remove (comma-separated)")
    p.add_argument("--heads-per-group", type=int, default=0, help="also remove this many query heads per K/V group")
    p.add_argument("--heal-minutes", type=float, default=2.0, help="healing budget per pruned model (0: none)")
    p.add_argument("--max-tokens", type=int, default=48, help="decode tokens per timing run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-chars", type=int, default=4000, help="characters of the pydoc perplexity text")
    p.add_argument("--out", default="weights/compress/pruned", help="folder for the healed HF checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", nargs="?", const="bench_results/prune.json", default=None)


def main(args) -> int:
    import copy

    from minfer.bench.timing import interleaved, table, write_json
    from minfer.compress.common import log, set_threads
    from minfer.compress.distill import save_student, train
    from minfer.compress.teacher import TeacherCache
    from minfer.eval.perplexity import perplexity, reference_text
    from minfer.metrics import RequestStats
    from minfer.generate import generate_tokens
    from minfer.llm import LLM
    from minfer.sampling import SamplingParams

    set_threads(args.threads)
    ratios = [float(r) for r in args.ffn_ratios.split(",") if r.strip()]
    llm = LLM(args.model, device="cpu", dtype="float32", prepack=False)
    dense, tok = llm.model, llm.tokenizer
    train_cache, heldout = TeacherCache(Path(args.cache) / "train"), TeacherCache(Path(args.cache) / "heldout")
    calib = train_cache.batch(range(4)).tokens                           # calibration: training text only
    ppl_ids = tok.encode(reference_text(args.ppl_chars))                 # pydoc: never trained on
    ppl = lambda m: perplexity(m, ppl_ids, context=256, stride=128).perplexity  # noqa: E731
    models = {"dense": dense}
    for r in ratios:
        models[f"structured ffn {r:.0%}" + (f" -{args.heads_per_group}h/grp" if args.heads_per_group else "")] = \
            prune_model(dense, calib, r, args.heads_per_group)[0]
        models[f"unstructured ffn {r:.0%}"] = magnitude_sparsify(copy.deepcopy(dense), r)
    prompt = tok.encode(reference_text(600)[-300:])
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    def timer(m):
        def run():
            met = RequestStats(arrival_time=time.perf_counter())
            list(generate_tokens(m, prompt, params, metrics=met))
            t = met.token_times
            return {"decode_tps": (len(t) - 1) / (t[-1] - t[0])}
        return run

    log("timing decode, interleaved ...")
    med = interleaved({n: timer(m) for n, m in models.items()}, repeats=args.repeats, warmup=1, log=log)
    rows = []
    for name, m in models.items():
        row = {"model": name, "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
               "nonzero_M": sum(int((p != 0).sum()) for p in m.parameters()) / 1e6,
               "decode_tps": med[name]["decode_tps"], "speedup": med[name]["decode_tps"] / med["dense"]["decode_tps"],
               "ppl_before": ppl(m), "ppl_healed": None}
        if name.startswith("structured") and args.heal_minutes > 0:
            log(f"healing {name} for {args.heal_minutes} min ...")
            curve = train(m, train_cache, heldout, minutes=args.heal_minutes, batch=1, lr=2e-4,
                          eval_every=10 ** 9, log=log)
            row["ppl_healed"] = ppl(m)
            row["heal_steps"] = curve[-1]["step"]
            save_student(m, Path(args.out) / name.replace(" ", "_").replace("%", "pct").replace("/", ""),
                         args.model, curve)
        rows.append(row)
        log(str(row))
    print(table(rows, [("model", "model", "{:>30}"), ("params_M", "params M", "{:.1f}"), ("nonzero_M", "nonzero M", "{:.1f}"),
                       ("decode_tps", "tok/s", "{:.1f}"), ("speedup", "x dense", "{:.2f}"),
                       ("ppl_before", "ppl", "{:.2f}"), ("ppl_healed", "ppl healed", "{:.2f}")]))
    print(f"\nperplexity: first {args.ppl_chars} chars of pydoc_data.topics (never trained on), context 256, stride 128; "
          f"threads {torch.get_num_threads()}; shared machine")
    if args.json:
        write_json(args.json, {"benchmark": "prune", "rows": rows, "args": {k: v for k, v in vars(args).items()
                                                                              if isinstance(v, (int, float, str))}})
    return 0
=======
>>>>>>> main
