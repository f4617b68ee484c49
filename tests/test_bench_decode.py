"""`minfer bench decode`'s transformers-compiled peer: listed, run when it can, left out cleanly when not."""
from __future__ import annotations

import pytest
import torch
from tiny import tiny_config, tiny_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    cfg = tiny_config(vocab_size=260, max_position_embeddings=256)   # the prompt is 140 byte tokens
    return save_hf_folder(tmp_path_factory.mktemp("m") / "m", cfg, tiny_model(cfg).state_dict(), *tiny_tokenizer())


def _bench(folder, methods, capsys):
    from minfer.cli import main
    rc = main(["bench", "decode", "--model", str(folder), "--methods", methods, "--max-tokens", "4",
               "--repeats", "1", "--no-kv-quality"])
    return rc, capsys.readouterr()


def test_compiled_peer_is_listed(capsys):
    from minfer.bench.decode import METHODS
    from minfer.cli import main
    assert "transformers-compiled" in METHODS
    assert main(["bench", "decode", "--methods", "cached,transformers-compield"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) ['transformers-compield']" in err and "'transformers-compiled'" in err


def test_compiled_peer_that_cannot_compile_is_left_out_with_the_reason(folder, capsys, monkeypatch):
    """No compiler (here: torch.compile raising) -> one line naming why, and the other methods still run."""
    def no_compile(*args, **kwargs):
        raise RuntimeError("Compiler: cc not found")
    monkeypatch.setattr(torch, "compile", no_compile)
    rc, out = _bench(folder, "cached,transformers-compiled", capsys)
    assert rc == 0, out.err
    assert "transformers-compiled cannot run here, left out: transformers could not compile" in out.out
    assert "cc not found" in out.out
    rows = [line for line in out.out.splitlines() if "|" in line]
    assert any(line.strip().startswith("cached") for line in rows)
    assert not any("transformers-compiled" in line for line in rows)


def test_compiled_peer_that_does_not_compile_is_not_reported_as_compiled(folder, monkeypatch):
    """If transformers ran generate without compiling, the peer refuses to pose as compiled."""
    from minfer.bench.peers import StaticCompiledHF, hf_model
    from minfer.llm import LLM
    llm = LLM(str(folder))
    peer = StaticCompiledHF(hf_model(llm.config, llm.model.state_dict()))
    peer.compile_config._compile_all_devices = False        # transformers' own "CPU: do not compile"
    with pytest.raises(RuntimeError, match="did not compile the decode step"):
        peer.warm_up(llm.tokenizer.encode("hello"), 3)
    with pytest.raises(RuntimeError, match="warm_up"):
        StaticCompiledHF(peer.model).timed([1, 2], 3)


@pytest.mark.slow      # inductor compiles C++ on the CPU: tens of seconds
def test_compiled_peer_runs_and_gives_the_same_greedy_tokens(folder, capsys):
    rc, out = _bench(folder, "cached,transformers,transformers-compiled", capsys)
    assert rc == 0, out.err
    assert "transformers-compiled greedy tokens identical to cached: True" in out.out
    assert "transformers greedy tokens identical to cached: True" in out.out
    assert "compiling cost about" in out.out


def test_static_decode_step_methods_run_and_give_the_eager_tokens(folder, capsys):
    """llm-graphs (the static step; replay on a CPU) gives the eager engine's tokens, with its start-up
    (compile, capture) reported apart from the table."""
    rc, out = _bench(folder, "cached,static,llm,llm-graphs", capsys)
    assert rc == 0, out.err
    assert "llm-graphs greedy tokens identical to cached: True" in out.out
    assert "static greedy tokens identical to cached: True" in out.out and "static / cached decode" in out.out
    assert "llm-graphs / llm (eager) decode tok/s = " in out.out and "graph capture 0.0 s" in out.out


def test_llama_cpp_peer_without_a_gguf_is_left_out_with_the_reason(folder, capsys):
    from minfer.cli import main
    rc = main(["bench", "decode", "--model", str(folder), "--methods", "cached", "--peers", "llama.cpp",
               "--max-tokens", "4", "--repeats", "1", "--no-kv-quality"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "llama.cpp cannot run here, left out: no GGUF file" in out
    assert any(line.strip().startswith("cached") for line in out.splitlines() if "|" in line)


def test_llama_cpp_peer_not_installed_says_so(folder, capsys, monkeypatch, tmp_path):
    import sys

    from minfer.cli import main
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp -> ImportError
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    rc = main(["bench", "decode", "--model", str(folder), "--methods", "cached", "--peers", "llama.cpp",
               "--peer-gguf", str(tmp_path / "m.gguf"), "--max-tokens", "4", "--repeats", "1", "--no-kv-quality"])
    assert rc == 0
    assert "left out: llama-cpp-python is not installed" in capsys.readouterr().out


def test_quantized_copies_are_methods_and_bad_names_are_refused(folder, capsys):
    from minfer.cli import main
    rc, out = _bench(folder, "cached,cached:int8", capsys)
    assert rc == 0, out.err
    assert any(line.strip().startswith("cached:int8") for line in out.out.splitlines() if "|" in line)
    rc, out = _bench(folder, "cached,cached:int8-a8,cached:int8-a8:plain", capsys)
    assert rc == 0, out.err
    rows = [line.split("|") for line in out.out.splitlines() if line.strip().startswith("cached:int8-a8") and "|" in line]
    assert len(rows) == 2 and all(r[-2].strip().endswith("%") and r[-1].strip().isdigit() for r in rows)
    assert "fused C++ layer: cached:int8-a8 / cached:int8-a8:plain decode tok/s" in out.out
    from minfer.kernels import cpu_quant_linear                              # which dot product ran
    assert f"int8-activation kernel: {cpu_quant_linear.isa() or 'the plain-torch reference'}" in out.out
    rc, out = _bench(folder, "cached,cached:plain", capsys)                  # float32, fused and not
    assert rc == 0, out.err
    assert "fused C++ layer: cached / cached:plain decode tok/s" in out.out
    assert main(["bench", "decode", "--model", str(folder), "--methods", "cached:int9"]) == 2
    assert "unknown quantization 'int9'" in capsys.readouterr().err
    assert main(["bench", "decode", "--model", str(folder), "--methods", "cached", "--peers", "vllm"]) == 2
    assert "--peers" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_peer_runs_on_smollm2(smollm2_dir, capsys):
    pytest.importorskip("llama_cpp")
    from minfer.cli import main
    rc = main(["bench", "decode", "--model", str(smollm2_dir), "--methods", "cached", "--peers", "llama.cpp",
               "--max-tokens", "8", "--repeats", "1", "--no-kv-quality", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("llama.cpp |"))
    assert float(row.split("|")[1]) > 0 and "Q4_1.gguf, 1 threads" in out


def test_teacher_forced_logits_follow_the_model_own_greedy_path():
    """Fed its own greedy tokens, a model's argmax at every step is the token it chose."""
    from minfer.bench.decode import teacher_forced_logits
    from minfer.generate import generate_tokens
    from minfer.sampling import SamplingParams
    model = tiny_model(tiny_config())
    prompt = [3, 14, 15, 92, 6]
    tokens = list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)))
    logits, _ = teacher_forced_logits(model, prompt, tokens)
    assert logits.shape == (10, model.cfg.vocab_size) and logits.argmax(-1).tolist() == tokens
