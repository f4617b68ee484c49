"""`minfer quantize MODEL OUT [--format int4]`: quantize a model's weights and save them as a folder.

OUT (config.json, tokenizer files, model.safetensors) is written atomically. ``--force`` replaces only
a folder this command wrote; ``.``, its parents and the source model's folder are always refused.
"""
import argparse
import os
import sys
from pathlib import Path

from minfer import atomic
from minfer.cli_args import positive_int

# every file `minfer quantize` writes into OUT
WRITTEN = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registry name, HF folder or .gguf file")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="int4",
                   help="int8 | int4 | int4-gN | q8_0 | q4_0 | q4_1 (default int4)")
    p.add_argument("--group-size", type=positive_int, default=None, help="int4 group size (default 32)")
    p.add_argument("--lm-head", default="int8",
                   help="what the LM head becomes: int8 (default) | same | none | any format name")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def check_output_folder(out: Path, model: str, force: bool) -> None:
    """Refuse, before any work, an OUT that replacing could destroy something we did not write."""
    from minfer.quant.apply import is_quantized_checkpoint
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"OUT {out} is the current folder or one of its parents; give a new folder name")
    src = Path(model).expanduser()
    if src.exists() and (src.resolve() == target or target in src.resolve().parents):
        raise ValueError(f"OUT {out} holds the model being quantized ({model}); give another folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"OUT {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not ({p.name for p in target.iterdir()} <= WRITTEN and is_quantized_checkpoint(target)):
            raise ValueError(f"OUT {out} is a non-empty folder that is not a minfer quantized checkpoint; "
                             f"refusing to replace it (even with --force)")
        if not force:
            raise ValueError(f"{out} exists; pass --force to replace it")
    parent = next(p for p in target.parents if p.exists())           # the nearest existing folder above
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"OUT {out}: cannot create a folder in {parent} (not a writable folder)")


def main(args) -> int:
    from minfer.loading import load_model
    from minfer.quant.apply import describe, parse_spec, quantize_model, save_quantized

    spec = parse_spec(args.format, args.group_size)
    lm_head = None if args.lm_head == "none" else args.lm_head
    if lm_head not in (None, "same"):
        parse_spec(lm_head)
    out = Path(args.out)
    check_output_folder(out, args.model, args.force)
    cfg, model, tokenizer = load_model(args.model)                # float32 on the CPU, plain linears
    float_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    quantize_model(model, spec, lm_head=lm_head)

    with atomic.atomic_dir(out) as tmp:           # a sibling temp folder, renamed into place when complete
        save_quantized(model, tmp / "model.safetensors")
        atomic.write_json(tmp / "config.json", cfg.to_hf())
        atomic.write_text(tmp / "tokenizer.json", tokenizer._tok.to_str())
        if tokenizer.config:
            atomic.write_json(tmp / "tokenizer_config.json", tokenizer.config)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out}: {describe(model)}, model.safetensors {size / 1e6:.1f} MB "
          f"(float32 checkpoint {float_bytes / 1e6:.1f} MB)", file=sys.stderr)
    return 0
