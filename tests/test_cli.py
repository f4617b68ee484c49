"""The command line: help, bad input, and the main job on the default model."""
from __future__ import annotations

import subprocess
import sys

import pytest

from minfer.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "chat", "weights", "bench", "lessons"):
        assert cmd in out


def test_unknown_model_lists_the_known_ones(capsys):
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "smollm2-135m-instruct" in err


@pytest.mark.parametrize("flag,value,field", [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"),
                                              ("--max-tokens", "0", "max_tokens"), ("--top-k", "-3", "top_k")])
def test_bad_sampling_flag_names_the_field(capsys, flag, value, field):
    assert main(["generate", "hi", flag, value]) == 2
    assert f"{flag} must be" in capsys.readouterr().err     # the option as the user typed it


def test_weights_list_shows_the_default(capsys):
    assert main(["weights", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


@pytest.mark.model
def test_generate_chat_paris(smollm2_dir):
    """The README's main job, run as a user would."""
    proc = subprocess.run([sys.executable, "-m", "minfer.cli", "generate", "--chat",
                           "What is the capital of France?", "--temperature", "0", "--model", str(smollm2_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "TTFT" in proc.stderr and "tokens/s" in proc.stderr


@pytest.mark.model
def test_interactive_chat_answers_and_exits(smollm2_dir):
    proc = subprocess.run([sys.executable, "-m", "minfer.cli", "chat", "--temperature", "0", "--max-tokens", "30",
                           "--model", str(smollm2_dir)],
                          input="What is the capital of France?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
