"""Structured pruning (whole FFN channels, whole query heads) + healing by distillation.

Activation-aware scores as Wanda (Sun et al. 2024) and LLM-Pruner (Ma et al. 2023); every layer loses
the same fraction, then ``distill.train`` heals (as Sheared-LLaMA, Minitron). docs/compression.md.
"""
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


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in increasing order (the kept channels keep their order)."""
    return scores.topk(keep).indices.sort().values


def prune_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scores: torch.Tensor, keep: int):
    """One layer's FFN cut to its ``keep`` best channels: gate, up (f, h) -> (keep, h); down (h, f) -> (h, keep)."""
    idx = top_channels(scores, keep)
    return gate[idx], up[idx], down[:, idx]


def choose(ffn_scores, head_scores, cfg, ffn_ratio: float, heads_per_group: int = 0):
    """Indices to KEEP per layer: the top (1 - ffn_ratio) channels, and all but ``heads_per_group`` heads per group."""
    if not 0.0 <= ffn_ratio < 1.0:
        raise ValueError(f"ffn_ratio must lie in [0, 1), got {ffn_ratio}")
    G = (cfg.num_attention_heads // cfg.num_key_value_heads)
    if not 0 <= heads_per_group < G:
        raise ValueError(f"heads_per_group must lie in [0, {G - 1}] (query heads per K/V head: {G}), got {heads_per_group}")
    keep_f = cfg.intermediate_size - int(round(ffn_ratio * cfg.intermediate_size))
    ffn_keep = [top_channels(s, keep_f) for s in ffn_scores]
    head_keep = []
    for s in head_scores:
        groups = s.view(cfg.num_key_value_heads, G)                               # query heads of each K/V head
        top = groups.topk(G - heads_per_group, dim=1).indices.sort(dim=1).values  # (nkv, G - drop)
        head_keep.append((top + torch.arange(cfg.num_key_value_heads)[:, None] * G).flatten())
    return ffn_keep, head_keep


def _cut(cfg, f: torch.Tensor, h: torch.Tensor):
    """(name in a layer, dim, kept indices, full size) of every tensor that pruning to FFN channels ``f`` and
    query heads ``h`` cuts."""
    hd, q_out, inter = cfg.head_dim, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
    rows = (h[:, None] * hd + torch.arange(hd)).flatten()               # the kept heads' rows
    return (("mlp.gate_proj.weight", 0, f, inter),
            ("mlp.up_proj.weight", 0, f, inter),
            ("mlp.down_proj.weight", 1, f, inter),
            ("self_attn.q_proj.weight", 0, rows, q_out),
            ("self_attn.q_proj.bias", 0, rows, q_out),
            ("self_attn.o_proj.weight", 1, rows, q_out))


def prune_state(model, ffn_keep, head_keep):
    """-> (smaller config, state dict) with only the kept FFN channels and query heads."""
    cfg = model.cfg
    new_cfg = dataclasses.replace(cfg, intermediate_size=len(ffn_keep[0]),
                                  num_attention_heads=len(head_keep[0]), head_dim=cfg.head_dim, extra={})
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    for i, (f, h) in enumerate(zip(ffn_keep, head_keep)):
        for name, dim, idx, _ in _cut(cfg, f, h):
            if (key := f"model.layers.{i}.{name}") in sd:
                sd[key] = sd[key].index_select(dim, idx)
    return new_cfg, sd


def unprune_state(pruned_sd, cfg, ffn_keep, head_keep):
    """Put a pruned state dict back at full size: kept rows/columns in place, zeros elsewhere."""
    sd = dict(pruned_sd)
    for i, (f, h) in enumerate(zip(ffn_keep, head_keep)):
        for name, dim, idx, full in _cut(cfg, f, h):
            if (key := f"model.layers.{i}.{name}") in sd:
                shape = list(sd[key].shape)
                shape[dim] = full
                sd[key] = sd[key].new_zeros(shape).index_copy_(dim, idx, sd[key])
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
