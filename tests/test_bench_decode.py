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
