"""Real server processes for the HTTP tests: a tiny random model folder, start / wait / stop.

Every server listens on 127.0.0.1 on a free port and is stopped by the test
that started it (SIGINT, as Ctrl-C; SIGKILL if it does not exit).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from minfer.serving.router import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]


def tiny_model_folder(path: Path) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer and a ChatML template (context 256)."""
    from minfer.checkpoints.hf import save_hf_folder
    from test_serving import TOKENIZER_CONFIG, byte_tokenizer_json
    from tiny import tiny_config, tiny_model
    model = tiny_model(tiny_config(vocab_size=259, max_position_embeddings=256), seed=1)
    return save_hf_folder(path, model.cfg, model.state_dict(), tokenizer_json=byte_tokenizer_json(),
                          tokenizer_config=TOKENIZER_CONFIG)


class Server:
    """``minfer serve`` (or ``minfer router``) in a child process."""

    def __init__(self, *args: str, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "minfer.cli", *args, "--port", str(self.port)],
                                     env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def wait(self, timeout: float = 120.0) -> "Server":
        wait_healthy(self.url, self.proc, timeout)
        return self

    def stop(self, sig=signal.SIGINT, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ThreadServer:
    """An ASGI app (e.g. the router) served by uvicorn on 127.0.0.1 in a thread of this process:
    real HTTP, without the start-up cost of one more Python process."""

    def __init__(self, app):
        import threading

        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 60.0) -> "ThreadServer":
        wait_healthy(self.url, None, timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def serve(folder: Path, *extra: str, log: Path | None = None) -> Server:
    return Server("serve", str(folder), "--threads", "1", *extra, log=log)


def metric(url: str, name: str, default: float | None = None) -> float:
    """One sample of /metrics (summed over its label sets); ``default`` when a labelled one has none yet."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    if not vals and default is not None:
        return default
    if not vals:
        raise KeyError(f"{name} not in /metrics")
    return sum(vals)


def stop_all(servers: list[Server], timeout: float = 20.0) -> None:
    """Ctrl-C every server at once, then wait for each."""
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGINT)
    for s in servers:
        s.stop(timeout=timeout)
