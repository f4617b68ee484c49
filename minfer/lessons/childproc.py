"""The learner's side of ``minfer lessons grade``: load the cells, run the function, return data.

The whole program of the untrusted process (``python -I -S -c <this source>``): JSON lines in and out,
values as data (``encode``/``decode``), never objects. The protocol: docs/teaching.md.
"""
import json
import linecache
import os
import sys
import traceback
from contextlib import suppress
from typing import Any, Callable, Optional

CELL_PREFIX = "<cell "          # the file name of every piece of the learner's code
MAX_DEPTH = 40                  # nesting beyond this is not an answer


def encode(x: Any, depth: int = 0) -> Any:
    """``x`` as JSON-ready data; objects of other kinds become ``{"object": type name}``."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep")
    if x is None:
        return None
    for kind, plain in ((bool, bool), (int, int), (float, float), (str, str.__str__)):   # subclasses: plain
        if isinstance(x, kind):
            return plain(x)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t, dtype = x.detach().cpu(), str(x.dtype).removeprefix("torch.")
        t = t.float() if dtype in ("bfloat16", "float16") else t      # sent as float32 values
        return {"tensor": [dtype, list(t.shape), t.contiguous().tolist()]}
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.ndarray):
        return {"ndarray": [x.dtype.str, list(x.shape), x.tolist()]}
    if np is not None and isinstance(x, np.generic):
        return encode(x.item(), depth + 1)
    if isinstance(x, tuple):
        return {"tuple": [encode(v, depth + 1) for v in x]}
    if isinstance(x, list):
        return [encode(v, depth + 1) for v in x]
    if isinstance(x, dict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if type(x).__name__ == "CountingModel" and hasattr(x, "seed"):
        return {"model": int(x.seed)}           # the grader's tiny model: rebuilt from its seed
    return {"object": type(x).__name__}


def _opaque(type_name: str) -> Any:
    """A stand-in for an object that could not travel: its class carries the name."""
    cls = type(str(type_name)[:80] or "object", (), {"__repr__": lambda self: f"<{type_name} object>"})
    return cls()


def decode(x: Any, models: Optional[dict] = None) -> Any:
    """The value ``encode`` wrote. ``{"model": seed}`` is built with ``models`` (the child's)."""
    if isinstance(x, list):
        return [decode(v, models) for v in x]
    if not isinstance(x, dict):
        return x
    (kind, v), = x.items()
    if kind == "tuple":
        return tuple(decode(e, models) for e in v)
    if kind == "dict":
        return {decode(k, models): decode(e, models) for k, e in v}
    if kind == "tensor":
        import torch
        dtype, shape, data = v
        wire = torch.float32 if dtype in ("bfloat16", "float16") else getattr(torch, dtype)
        return torch.tensor(data, dtype=wire).reshape(shape).to(getattr(torch, dtype))
    if kind == "ndarray":
        import numpy as np
        dtype, shape, data = v
        return np.array(data, dtype=np.dtype(dtype)).reshape(shape)
    if kind == "model" and models is not None:
        return models(v)
    return _opaque(v)


# --- The watch on calls into minfer ---
def is_allowed(name: str, allowed: tuple) -> bool:
    """Is ``name`` ("module:qualname") one of ``allowed``? A pattern ending in ``*``
    allows every name it prefixes ("minfer.model:*": the whole model)."""
    return any(name == a or (a.endswith("*") and name.startswith(a[:-1])) for a in allowed)


def _minfer_name(frame, minfer_dir: str) -> Optional[str]:
    code = frame.f_code
    if not code.co_filename.startswith(minfer_dir):
        return None
    return f"{frame.f_globals.get('__name__', '?')}:{getattr(code, 'co_qualname', code.co_name)}"


def call_watched(fn: Callable, args: list, allowed: tuple) -> tuple[Any, Optional[str]]:
    """``fn(*args)``, and the first minfer function it called that is not ``allowed``: a trace hook
    that catches an honest mistake, not a determined one (docs/teaching.md)."""
    minfer = sys.modules.get("minfer")
    if minfer is None or not getattr(minfer, "__file__", None):
        return fn(*args), None
    minfer_dir = os.path.dirname(os.path.abspath(minfer.__file__))
    found: list[str] = []

    def hook(frame, event, arg):
        if event != "call" or found:
            return None
        name = _minfer_name(frame, minfer_dir)
        if name is None or is_allowed(name, allowed):
            return None
        caller = frame.f_back
        while caller is not None:
            outer = _minfer_name(caller, minfer_dir)
            if outer is not None and is_allowed(outer, allowed):
                return None
            caller = caller.f_back
        found.append(name)
        return None

    previous = sys.gettrace()
    sys.settrace(hook)
    try:
        result = fn(*args)
    finally:
        sys.settrace(previous)
    return result, (found[0] if found else None)


# --- The child's loop ---
def _learner_frame(error: BaseException) -> Optional[dict]:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(CELL_PREFIX)]
    if not frames:
        return None
    f = frames[-1]
    return {"name": f.name, "lineno": f.lineno, "line": f.line or ""}


def _raised(e: BaseException) -> dict:
    message = str(e).strip().split("\n")[0][:500]
    return {"raised": {"type": type(e).__name__, "message": message,
                       "not_implemented": isinstance(e, NotImplementedError),
                       "where": _learner_frame(e)}}


def _load(job: dict) -> tuple[Optional[Callable], dict]:
    """Run the prelude, the context statements and the cell; the function, or the answer why not."""
    ns: dict = {"__name__": "__submission__"}
    try:
        exec(compile(job["prelude"], "<prelude>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001
        return None, {"crashed": f"the exercise's prelude failed: {type(e).__name__}: {e}"}
    for label, source in job["context"]:
        with suppress(Exception):         # an import this process cannot do is skipped
            exec(compile(source, label, "exec"), ns)
    label, source = job["cell"]
    linecache.cache[label] = (len(source), None, source.splitlines(True), label)
    try:
        exec(compile(source, label, "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - the cell's failure is the answer
        where = _learner_frame(e)
        at = f" (line {where['lineno']}: {where['line']})" if where else ""
        hint = ("; minfer cannot be imported while this exercise is graded: that would call "
                "the engine's own implementation, write the body yourself"
                if isinstance(e, ImportError) and "minfer" in str(e) else "")
        return None, {"crashed": f"the cell raised {type(e).__name__}: {str(e)[:300]}{at}{hint}"}
    fn = ns.get(job["function"])
    if fn is None:
        return None, {"missing": f"the cell does not define {job['function']}"}
    return fn, {"ready": True}


def _answer(fn: Callable, args: list, allowed: tuple) -> dict:
    made: list = []

    def build(seed: int):             # ``{"model": seed}``: the grader's tiny counting model
        from minfer.lessons.ex_loops import CountingModel
        made.append(CountingModel(int(seed)))
        return made[-1]
    try:
        values = [decode(a, build) for a in args]
        out, callee = call_watched(fn, values, allowed)
    except Exception as e:  # noqa: BLE001 - the learner's bug is an answer
        return _raised(e)
    if callee is not None:
        return {"engine": callee}
    calls = [[[list(shape), bool(cached)] for shape, cached in m.calls] for m in made]
    return {"ok": encode(out), "calls": calls}


def main() -> None:
    """Serve the grading process until stdin closes."""
    with suppress(OSError, AttributeError):   # die with the grading process (Linux)
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)     # PR_SET_PDEATHSIG
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)                             # the learner's prints go to stderr
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    job = json.loads(sys.stdin.readline())
    allowed = tuple(job["allowed"])
    fn, ready = _load(job)
    send(ready)
    if fn is None:
        return
    for line in sys.stdin:
        try:
            send(_answer(fn, json.loads(line)["args"], allowed))
        except Exception as e:  # noqa: BLE001 - an output that is not data
            send(_raised(ValueError(f"the function's output cannot be graded: {e}")))


if __name__ == "__main__":
    sys.path[:] = json.loads(sys.argv[1])
    main()
