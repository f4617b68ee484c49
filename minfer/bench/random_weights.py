"""Random weights in the shapes of real models, for machines that cannot download any.

    python -m minfer.bench.random_weights OUT --shape smollm2-135m [--tokenizer-from DIR]

Speed depends on shapes, not values (docs/measuring.md).
"""
import argparse
import shutil
import sys
from pathlib import Path

from minfer.config import ModelConfig

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b-body": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                              bos_token_id=1, eos_token_id=2),
}


def write_random_folder(out: str | Path, shape: str, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """Write an HF folder with random weights of ``shape`` and the tokenizer files of ``tokenizer_from``."""
    from minfer.checkpoints.hf import save_hf_folder
    from minfer.model import build_model

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    src = Path(tokenizer_from)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src}/tokenizer.json not found: --tokenizer-from needs a folder with a "
                                f"49152-token tokenizer.json (e.g. weights/smollm2-135m-instruct)")
    cfg = ModelConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, **SHAPES[shape])
    state = build_model(cfg, seed=seed).state_dict()
    tok_cfg = src / "tokenizer_config.json"
    out = save_hf_folder(out, cfg, state, tokenizer_json=(src / "tokenizer.json").read_text(encoding="utf-8"),
                         extra_files={"minfer_source.json": f'{{"random_weights": "{shape}", "seed": {seed}}}\n'})
    if tok_cfg.is_file():
        shutil.copyfile(tok_cfg, out / "tokenizer_config.json")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minfer.bench.random_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (replaced if it exists)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--tokenizer-from", default="weights/smollm2-135m-instruct")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        out = write_random_folder(args.out, args.shape, args.tokenizer_from, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"random_weights: error: {e}", file=sys.stderr)
        return 2
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({args.shape}, model.safetensors {size / 1e6:.0f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
