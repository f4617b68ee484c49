"""`minfer quantize MODEL OUT`: quantize a model's weights and save them as a folder.

    minfer quantize smollm2-135m-instruct out/smollm2-int4 --format int4 --group-size 32
    minfer generate "Hello" --model out/smollm2-int4

OUT gets config.json, tokenizer.json (+ tokenizer_config.json) and one
model.safetensors holding the quantized tensors, with the format of every
module in its metadata (see ``minfer.quant.apply``). The folder is written
next to OUT under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registry name, HF folder or .gguf file")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="int4",
                   help="int8 | int4 | int4-gN | q8_0 | q4_0 | q4_1 (default int4)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 32)")
    p.add_argument("--lm-head", default="int8",
                   help="what the LM head becomes: int8 (default) | same | none | any format name")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def main(args) -> int:
    from minfer.checkpoints import load_checkpoint
    from minfer.model import build_model
    from minfer.quant.apply import describe, parse_spec, quantize_model, save_quantized

    spec = parse_spec(args.format, args.group_size)
    lm_head = None if args.lm_head == "none" else args.lm_head
    if lm_head not in (None, "same"):
        parse_spec(lm_head)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    cfg, state_dict, tokenizer = load_checkpoint(args.model)
    model = build_model(cfg, state_dict)
    float_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    del state_dict
    quantize_model(model, spec, lm_head=lm_head)

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_quantized(model, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2), encoding="utf-8")
        (tmp / "tokenizer.json").write_text(tokenizer._tok.to_str(), encoding="utf-8")
        if tokenizer.config:
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer.config, indent=2),
                                                       encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out}: {describe(model)}, model.safetensors {size / 1e6:.1f} MB "
          f"(float32 checkpoint {float_bytes / 1e6:.1f} MB)", file=sys.stderr)
    return 0
