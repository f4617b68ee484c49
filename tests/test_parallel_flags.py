"""vLLM's parallel flags on the command line: ``--tensor-parallel-size`` / ``--pipeline-parallel-size``
start their own worker processes (no torchrun), and a degree the model cannot be split into is
refused before any process starts."""
from __future__ import annotations

import subprocess
import sys

import pytest

from minfer.cli import main
from minfer.distributed.checks import random_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """9 query heads over 3 K/V heads, as SmolLM2: tensor parallel sizes 1 and 3 only."""
    from test_checkpoints import tiny_tokenizer

    from minfer.checkpoints.hf import save_hf_folder
    cfg = tiny_config(vocab_size=260, hidden_size=36, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=48)
    return save_hf_folder(tmp_path_factory.mktemp("tp") / "nine-heads", cfg, random_model(cfg).state_dict(),
                          *tiny_tokenizer())


def _generate(capsys, folder, *flags) -> tuple[int, str, str]:
    code = main(["generate", "hello there", "--model", str(folder), "--temperature", "0", "--max-tokens", "8",
                 *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tensor_and_pipeline_parallel_flags_print_the_single_process_answer(capsys, folder):
    code, want, _ = _generate(capsys, folder)
    assert code == 0 and want.strip()
    assert _generate(capsys, folder, "--tensor-parallel-size", "3")[:2] == (0, want)
    assert _generate(capsys, folder, "--pipeline-parallel-size", "2")[:2] == (0, want)


def test_bad_degree_is_refused_before_any_process_starts(capsys, folder, monkeypatch):
    import torch.multiprocessing

    import minfer.distributed.runtime as runtime

    def never(*a, **k):
        raise AssertionError("a worker was started or a shard loaded")
    monkeypatch.setattr(torch.multiprocessing, "get_context", never)
    monkeypatch.setattr(runtime, "load_parallel_model", never)
    code, _, err = _generate(capsys, folder, "--tensor-parallel-size", "2")
    assert code == 2 and err == "minfer: error: nine-heads has 3 KV heads: tensor_parallel_size must divide 3, got 2\n"
    code, _, err = _generate(capsys, folder, "--pipeline-parallel-size", "64")
    assert code == 2 and "pipeline_parallel_size=64 is more than num_hidden_layers" in err
    code, _, err = _generate(capsys, folder, "--tensor-parallel-size", "3", "--pipeline-parallel-size", "2")
    assert code == 2 and "cannot both be > 1" in err


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_tensor_parallel_3_without_torchrun(smollm2_dir):
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "minfer.cli", "generate", "The capital of France is",
                               "--model", str(smollm2_dir), "--temperature", "0", "--max-tokens", "12", *flags],
                              capture_output=True, text=True, timeout=600)
    want = run()
    assert want.returncode == 0 and "Paris" in want.stdout, want.stderr[-2000:]
    assert run("--tensor-parallel-size", "3").stdout == want.stdout
    refused = run("--tensor-parallel-size", "2")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("has 3 KV heads: tensor_parallel_size must divide 3, got 2")
