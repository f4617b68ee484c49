"""Run a learner's function in a separate, limited process and get its outputs back as data.

``remote`` gives the grader a plain callable; the learner's process gets its own process group
(killed at the end), rlimits, a scratch folder, an empty environment and, with
``sandbox=True``, ``bwrap``. Limits are not a sandbox (docs/teaching.md).
"""
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import deque
from contextlib import suppress
from pathlib import Path
from typing import Optional

from minfer.lessons import childproc

DEFAULT_MEMORY_MB = 4096          # RLIMIT_AS of the learner's process (torch alone maps ~0.7 GB)
MAX_FILE_BYTES = 16 << 20         # RLIMIT_FSIZE: the largest file it may write
MAX_ANSWER_BYTES = 32 << 20       # the largest answer line read back
SANDBOX_TMP_BYTES = 64 << 20     # the sandbox's own /tmp (memory-backed)
STDERR_TAIL = 4096                # bytes of its stderr kept for a crash report
EXTRA_PROCS = 64                  # RLIMIT_NPROC: threads beyond what this user already runs
_MINFER_ROOT = str(Path(__file__).resolve().parents[2])    # the folder holding minfer/
# Never hidden in the sandbox, even when a submission or the current folder is there.
_SYSTEM_DIRS = {"/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/var", "/dev",
                "/proc", "/sys", "/run"}


class ChildGone(BaseException):
    """The learner's process is gone or broke the protocol: the verdict ("timeout" or "crashed").
    A ``BaseException``, so that hypothesis does not shrink it as a failing example: grading stops."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LearnerRaised(Exception):
    """The learner's function raised ``type``: ``message`` (in the other process)."""

    def __init__(self, kind: str, message: str, where: Optional[dict]):
        super().__init__(message)
        self.kind, self.where = kind, where


class LearnerNotImplemented(LearnerRaised, NotImplementedError):
    pass


class EngineCalled(Exception):
    """The learner's function called minfer's own implementation (``callee``)."""

    def __init__(self, callee: str):
        super().__init__(callee)
        self.callee = callee


def become_subreaper() -> None:
    """Orphaned descendants of this process are re-parented here, not to init (Linux)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)    # PR_SET_CHILD_SUBREAPER


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def kill_descendants(rounds: int = 20) -> None:
    """Kill and reap every process below this one (a fork loop gets several rounds)."""
    for _ in range(rounds):
        pids = _descendants(os.getpid()) if os.path.isdir("/proc") else []
        _kill(pids)
        with suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] != 0:       # reap every child that has exited
                pass
        if not pids:
            return
        time.sleep(0.01)


def _user_threads() -> int:
    try:
        return sum(int(Path(f"/proc/{p}/status").read_text().split("Threads:")[1].split()[0])
                   for p in os.listdir("/proc") if p.isdigit() and os.stat(f"/proc/{p}").st_uid == os.getuid())
    except (OSError, IndexError, ValueError):
        return 1024


def _limit(pid: int, timeout: float, memory_mb: int) -> None:
    cpu = int(timeout) + 2
    for which, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, _user_threads() + EXTRA_PROCS)):
        try:
            resource.prlimit(pid, which, (value, value))
        except (OSError, ValueError):      # it is already gone: the first answer will say so
            return


def _python_paths(with_minfer: bool) -> list[str]:
    """The child's sys.path: the standard library and installed packages, minfer's folder
    only when asked (without it, ``import minfer`` fails unless found on disk)."""
    paths = [p for p in sys.path if p and os.path.isdir(p) and not p.startswith(_MINFER_ROOT)
             and "site-packages" not in p and "dist-packages" not in p]
    paths += [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    if with_minfer:
        paths.insert(0, _MINFER_ROOT)
    return list(dict.fromkeys(paths))


def bwrap() -> str:
    """The path of bwrap; ValueError naming ``--sandbox`` where it is not installed."""
    exe = shutil.which("bwrap")
    if exe is None:
        raise ValueError("--sandbox needs bwrap (Debian/Ubuntu: apt-get install bubblewrap); "
                         "without it, grade untrusted submissions in a container")
    return exe


def _bwrap(scratch: str, hide: list[str], with_minfer: bool) -> list[str]:
    """bwrap's arguments: read-only root, no network, scratch writable, ``hide`` emptied."""
    args = [bwrap(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(SANDBOX_TMP_BYTES), "--tmpfs", "/tmp",
            "--unshare-all", "--die-with-parent"]     # no terminal: Popen already detached it (setsid)
    hidden = [f for f in dict.fromkeys(hide + ([] if with_minfer else
                                               [os.path.join(_MINFER_ROOT, "minfer")]))
              if os.path.isdir(f) and f not in _SYSTEM_DIRS]
    for folder in hidden:
        args += ["--tmpfs", folder]
    for keep in dict.fromkeys([sys.prefix, sys.base_prefix, *_python_paths(with_minfer)]):
        if os.path.isdir(keep) and any(keep.startswith(h) for h in hidden):
            args += ["--ro-bind", keep, keep]
    args += ["--bind", scratch, scratch]
    for folder in hidden:
        if not scratch.startswith(folder):
            args += ["--remount-ro", folder]
    return args + ["--chdir", scratch, "--"]


class Child:
    """One learner process serving one exercise; ``call`` asks it for an output."""

    def __init__(self, job: dict, *, timeout: float, memory_mb: int = DEFAULT_MEMORY_MB,
                 sandbox: bool = False, hide: Optional[list] = None, sweep_all: bool = False):
        self.timeout, self.sweep_all = timeout, sweep_all
        self.waited = 0.0         # seconds spent waiting for its answers: its share of the timeout
        self.scratch = tempfile.mkdtemp(prefix="minfer-grade-")
        with_minfer = bool(job["allowed"]) or "minfer" in job["prelude"]
        source = Path(childproc.__file__).read_text(encoding="utf-8")
        cmd = [sys.executable, "-I", "-S", "-c", source, json.dumps(_python_paths(with_minfer))]
        if sandbox:
            cmd = _bwrap(self.scratch, [str(h) for h in (hide or [])], with_minfer) + cmd
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.scratch, "TMPDIR": self.scratch,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=self.scratch, env=env,
                                     start_new_session=True, close_fds=True)
        _limit(self.proc.pid, timeout, memory_mb)
        self._stderr: deque = deque(maxlen=STDERR_TAIL)
        threading.Thread(target=self._drain, daemon=True).start()
        self._buffer = b""
        self.ready = self.ask(job)

    def _drain(self) -> None:
        """Keep only the tail of the learner's stderr (it may print gigabytes)."""
        while chunk := self.proc.stderr.read1(65536):
            self._stderr.extend(chunk)

    def _gone(self, what: str) -> ChildGone:
        self.close()
        if self.waited >= self.timeout or self.proc.returncode in (-signal.SIGXCPU,):
            return ChildGone("timeout", f"stopped after {self.timeout:g} s: an infinite loop, "
                                        f"or far too slow")
        tail = " | ".join(bytes(self._stderr).decode("utf-8", "replace").strip().splitlines()[-3:])
        return ChildGone("crashed", f"the learner's process {what} (exit {self.proc.returncode})"
                         + (f": {tail}" if tail else ""))

    def _read_line(self) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left, start = self.timeout - self.waited, time.monotonic()
            ready = left > 0 and select.select([fd], [], [], left)[0]
            self.waited += time.monotonic() - start
            if not ready:
                self.waited = max(self.waited, self.timeout)
                raise self._gone("ran out of time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._gone("died")
            self._buffer += chunk
            if len(self._buffer) > MAX_ANSWER_BYTES:
                raise self._gone(f"answered with more than {MAX_ANSWER_BYTES >> 20} MiB")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def ask(self, message: dict) -> dict:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            raise self._gone("died") from None
        try:
            answer = json.loads(self._read_line())
        except ValueError:
            raise self._gone("broke the protocol") from None
        if not isinstance(answer, dict) or len(answer) == 0:
            raise self._gone("broke the protocol")
        return answer

    def close(self) -> None:
        """Kill the learner's process, everything it started, and remove its scratch folder. ``sweep_all``
        (a grading process that is a child subreaper and runs nothing else): every descendant of this
        process, which includes the ones that left the learner's process group with setsid."""
        _kill(_descendants(self.proc.pid) if os.path.isdir("/proc") else [])
        if self.proc.returncode is None:
            with suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.sweep_all:
            kill_descendants()
        shutil.rmtree(self.scratch, ignore_errors=True)


def remote(child: Child, name: str):
    """A plain function that runs the learner's ``name`` in ``child`` and returns its output."""

    def fn(*args):
        answer = child.ask({"args": [childproc.encode(a) for a in args]})
        if "ok" in answer:
            models = [a for a in args if type(a).__name__ == "CountingModel"]
            for model, calls in zip(models, answer.get("calls", [])):
                model.calls[:] = [(tuple(shape), bool(cached)) for shape, cached in calls]
            return childproc.decode(answer["ok"])
        if "engine" in answer:
            raise EngineCalled(str(answer["engine"]))
        raised = answer.get("raised")
        if not isinstance(raised, dict):
            raise child._gone("broke the protocol")
        cls = LearnerNotImplemented if raised.get("not_implemented") else LearnerRaised
        raise cls(str(raised.get("type")), str(raised.get("message")), raised.get("where"))

    fn.__name__ = name
    return fn
