"""Submissions that try to forge a grade or harm the grader, run through ``minfer lessons grade``.

Each attack is a lesson-04 notebook whose ``slot_mapping`` (a cheap exercise)
tries one trick: forge the verdict line, patch the grader through
``sys.modules``, switch off the watch and call the engine, return an ``int``
whose ``==`` always says yes, allocate past ``--memory``, leave a process
running, flood stderr, a cell the parser cannot hold, and more. None may
get a point, outlive its timeout or allocate past ``--memory``; an honest
submission graded in the same run (its function in a new cell below the
stub, numpy imported in the first cell) gets full marks. ``--sandbox``
(bwrap) is tested where bwrap is installed.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
LESSON = "04_paged_attention"
TIMEOUT = 15            # seconds per exercise for the run (the hung attack waits it out)
MEMORY = 1536           # MiB: torch maps ~0.7 GB, the 3 GiB allocation must fail

STUB = ('def slot_mapping(block_table, block_size, start_pos, num_tokens):\n'
        '    """The slot of each new token."""\n'
        '    raise NotImplementedError("write slot_mapping")\n')
HONEST = ('BLOCK_UNIT = 1\n\n'
          'def slot_mapping(block_table, block_size, start_pos, num_tokens):\n'
          '    p = np.arange(start_pos, start_pos + num_tokens)\n'
          '    table = np.asarray(block_table, dtype=np.int64)\n'
          '    return (table[p // block_size] * block_size * BLOCK_UNIT + p % block_size).tolist()\n')
WRONG_FN = ('def slot_mapping(block_table, block_size, start_pos, num_tokens):\n'
            '    return [0] * num_tokens\n')
VERDICT = '{"status": "passed", "message": "passed"}'

ATTACKS = {
    # A: forged scores
    "forge_stdout_exit": ("import os\n" + WRONG_FN +
                          f"os.write(1, b'{VERDICT}\\n')\nos._exit(0)\n"),
    "forge_atexit": (f"import atexit\natexit.register(lambda: print('{VERDICT}'))\n" + WRONG_FN),
    "patch_grader": ("import sys\n"
                     "vars(sys)['mod' + 'ules']['minfer.lessons.grader']._one_example = "
                     "lambda *a, **k: None\n" + WRONG_FN),
    "patch_grader_quietly": ("import sys\n"
                             "g = vars(sys)['mod' + 'ules'].get('minfer.lessons.grader')\n"
                             "if g is not None:\n    g._one_example = lambda *a, **k: None\n"
                             + WRONG_FN),
    "untrace_and_call_engine": (
        "import sys as _s\ngetattr(_s, 'set' + 'trace')(None)\n"
        "def slot_mapping(block_table, block_size, start_pos, num_tokens):\n"
        "    getattr(_s, 'set' + 'trace')(None)\n"
        "    m = __import__('minfer.kv.block_pool', fromlist=['x'])\n"
        "    return m.compute_slot_mapping(block_table, block_size, start_pos, num_tokens)\n"),
    "lying_int": ("class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                  "    def __ne__(self, other):\n        return False\n"
                  "    __hash__ = int.__hash__\n\n"
                  "def slot_mapping(block_table, block_size, start_pos, num_tokens):\n"
                  "    return [Yes(0) for _ in range(num_tokens)]\n"),
    # B: no limits
    "allocate_3gib": ("def slot_mapping(block_table, block_size, start_pos, num_tokens):\n"
                      "    hog = bytearray(3 << 30)\n    return [len(hog)] * num_tokens\n"),
    "write_outside": ("open({escape!r}, 'w').write('escaped')\n" + WRONG_FN),
    "sleeper": ("import subprocess\n"
                "p = subprocess.Popen(['sleep', '240'], start_new_session=True)\n"
                "open({pidfile!r}, 'w').write(str(p.pid))\n" + WRONG_FN),
    "hang": ("def slot_mapping(block_table, block_size, start_pos, num_tokens):\n"
             "    while True:\n        pass\n"),
    # B2: one bad notebook must not stop the class
    "stderr_flood": ("import sys\nchunk = 'x' * (1 << 20)\n"
                     "for _ in range(300):\n    sys.stderr.write(chunk)\n" + WRONG_FN),
    # three more
    "forge_every_fd": ("import os\n" + WRONG_FN +
                       "for fd in range(3, 64):\n"
                       "    try:\n"
                       f"        os.write(fd, b'{VERDICT}\\n{{\"ok\": [0]}}\\n')\n"
                       "    except OSError:\n        pass\n"),
    "kill_the_grader": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + WRONG_FN),
    "segfault": ("import ctypes\n"
                 "def slot_mapping(block_table, block_size, start_pos, num_tokens):\n"
                 "    ctypes.string_at(0)\n    return [0] * num_tokens\n"),
}
DEEP = "x = " + "-" * 200_000 + "1\n"


def _notebook(path: Path, cell: str) -> Path:
    """A lesson-04 submission: numpy imported first, the stub, then ``cell`` in a new cell."""
    nb = new_notebook(cells=[new_code_cell("import numpy as np\nfrom minfer.lessons import check"),
                             new_code_cell(STUB, metadata={"tags": ["exercise"]}),
                             new_code_cell('check("paged.slot_mapping", slot_mapping)'),
                             new_code_cell(cell)])
    nbformat.write(nb, path)
    return path


def _grade(paths: list, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "minfer.cli", "lessons", "grade", *map(str, paths),
                           "--lesson", LESSON, "--json", str(out), "--timeout", str(TIMEOUT),
                           "--memory", str(MEMORY), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def _rows(table: dict, path: Path) -> dict:
    return {r["exercise"]: r for r in table["exercises"] if r["submission"] == str(path)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every attack, the honest submission and the unparsable one, in one run of the command."""
    tmp = tmp_path_factory.mktemp("attacks")
    escape, pidfile = tmp / "escaped.txt", tmp / "sleeper.pid"
    subs = {name: _notebook(tmp / f"{name}.ipynb", src.format(escape=str(escape), pidfile=str(pidfile))
                            if "{" in src and name in ("write_outside", "sleeper") else src)
            for name, src in ATTACKS.items()}
    subs["honest"] = _notebook(tmp / "honest.ipynb", HONEST)
    subs["deep"] = _notebook(tmp / "deep.ipynb", DEEP)
    start = time.perf_counter()
    proc, table = _grade(list(subs.values()), tmp / "scores.json", "--jobs", "3")
    return dict(subs=subs, table=table, proc=proc, seconds=time.perf_counter() - start,
                escape=escape, pidfile=pidfile)


def test_no_attack_gets_a_point_and_the_honest_one_gets_full_marks(graded):
    totals = graded["table"]["totals"]
    for name, path in graded["subs"].items():
        got = totals[str(path)]["points"]
        if name == "honest":
            assert got == 1, _rows(graded["table"], path)["paged.slot_mapping"]
        else:
            assert got == 0, (name, _rows(graded["table"], path))


def test_each_attack_fails_for_the_right_reason(graded):
    def row(name):
        return _rows(graded["table"], graded["subs"][name])["paged.slot_mapping"]
    assert row("forge_stdout_exit")["status"] == "crashed"
    assert row("lying_int")["status"] == "wrong"
    assert row("untrace_and_call_engine")["status"] == "raised"
    assert "No module named 'minfer'" in row("untrace_and_call_engine")["message"]
    assert "MemoryError" in row("allocate_3gib")["message"]
    assert row("hang")["status"] == "timeout"
    assert row("hang")["seconds"] < 2 * TIMEOUT + 60
    assert row("segfault")["status"] == "crashed"
    assert row("kill_the_grader")["status"] in ("crashed", "error")
    assert row("stderr_flood")["status"] == "wrong"
    assert len(row("stderr_flood")["message"]) < 10_000


def test_nothing_outlives_the_grader(graded):
    pid = int(graded["pidfile"].read_text())
    assert not _alive(pid), f"the sleeper {pid} outlived the grader"


def test_a_notebook_the_parser_cannot_hold_is_one_row(graded):
    deep = _rows(graded["table"], graded["subs"]["deep"])
    assert deep and all(r["points"] == 0 for r in deep.values())
    assert str(graded["subs"]["deep"]) in graded["proc"].stdout


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_timeout_must_be_finite_and_positive(tmp_path, capsys, value):
    from minfer.cli import main
    sub = _notebook(tmp_path / "s.ipynb", HONEST)
    with pytest.raises(SystemExit) as stop:
        main(["lessons", "grade", str(sub), "--timeout", value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--timeout" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap (bubblewrap) is not installed")
def test_sandbox_keeps_files_and_other_submissions_out_of_reach(tmp_path):
    other = _notebook(tmp_path / "other.ipynb", HONEST)
    escape = tmp_path / "escaped.txt"              # the submissions' folder: hidden, read-only
    outside = ROOT / f"escaped-{os.getpid()}.txt"  # the grader's folder: hidden, read-only
    snoop = ("def slot_mapping(block_table, block_size, start_pos, num_tokens):\n"
             "    try:\n"
             f"        n = len(open({str(other)!r}).read())\n"
             "    except OSError:\n        n = -7\n"
             "    try:\n"
             f"        open({str(escape)!r}, 'w').write('x')\n"
             "    except OSError:\n        n -= 20000\n"
             "    try:\n"
             f"        open({str(outside)!r}, 'w').write('x')\n"
             "    except OSError:\n        n -= 1000\n"
             "    return [n] * num_tokens\n")
    attacker = _notebook(tmp_path / "attacker.ipynb", snoop)
    try:
        proc, table = _grade([other, attacker], tmp_path / "scores.json", "--sandbox")
    finally:
        wrote_outside = outside.exists()
        outside.unlink(missing_ok=True)
    assert not wrote_outside
    assert table["totals"][str(other)]["points"] == 1
    assert table["totals"][str(attacker)]["points"] == 0
    message = _rows(table, attacker)["paged.slot_mapping"]["message"]
    assert "[-21007]" in message, message
    assert not escape.exists()


def test_an_honest_submission_passes_under_the_memory_limit(graded):
    honest = _rows(graded["table"], graded["subs"]["honest"])["paged.slot_mapping"]
    assert honest["status"] == "passed", honest
