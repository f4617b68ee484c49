"""``minfer lessons student-edition OUT --nbgrader``: nbgrader source notebooks.

The default run checks the metadata of every lesson's nbgrader edition
against nbgrader's schema (version 3) without running anything; the ``slow``
test runs nbgrader's own ``generate_assignment`` and ``autograde`` on a tiny
lesson and reads the scores from its gradebook.
"""
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minfer.lessons import exercises
from minfer.lessons.notebooks import is_solution, lesson_paths, nbgrader_notebook

ROOT = Path(__file__).resolve().parents[1]
LESSONS = lesson_paths(ROOT / "lessons")


@pytest.mark.parametrize("path", LESSONS, ids=[p.name for p in LESSONS])
def test_nbgrader_metadata_follows_the_schema(path):
    src = nbformat.read(path, as_version=4)
    nb = nbgrader_notebook(src)
    nbformat.validate(nb)
    ids, solutions, graded = set(), 0, 0
    for before, cell in zip(src.cells, nb.cells):
        meta = cell.metadata.get("nbgrader")
        if meta is None:
            continue
        assert meta["schema_version"] == 3
        assert set(meta) >= {"grade", "solution", "locked", "grade_id"}
        assert meta["grade_id"] not in ids
        ids.add(meta["grade_id"])
        if meta["solution"]:
            solutions += 1
            assert is_solution(before) and not meta["grade"] and not meta["locked"]
            assert cell.source.count("### BEGIN SOLUTION") == cell.source.count("### END SOLUTION") >= 1
        if meta["grade"]:
            graded += 1
            assert meta["locked"] and meta["points"] >= 1
            assert "assert " in cell.source and "### BEGIN HIDDEN TESTS" in cell.source
    names = [n for n in exercises.names() if exercises.get(n).lesson == path.stem]
    assert solutions == graded == len(names)


SOLUTION = '''import torch

def rms_norm(x, weight, eps):
    """Normalise the last dim by its root mean square, then scale by weight."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight'''


def _test_cell(solution: str) -> str:
    nb = new_notebook(cells=[new_code_cell(solution, metadata={"tags": ["solution"]}),
                             new_code_cell('check("model.rms_norm", rms_norm)')])
    return nbgrader_notebook(nb).cells[1].source


LYING_CHECK = "def check(*a, **k):\n    return True\n"
WRONG = "def rms_norm(x, weight, eps):\n    return x * weight\n"


def test_a_notebook_that_redefines_check_fails_the_hidden_test(capsys):
    """The graded cell's hidden test calls the grader's check, imported as it runs."""
    test = _test_cell(SOLUTION)
    for solution, passes in ((SOLUTION, True), (WRONG, False)):
        ns: dict = {}
        exec(LYING_CHECK, ns)            # the notebook's own check, defined before the test
        exec("import torch\n" + solution, ns)
        if passes:
            exec(test, ns)
        else:
            with pytest.raises(AssertionError):
                exec(test, ns)
        assert ns["check"](0) is True     # the notebook's check is still its own


@pytest.mark.slow
def test_nbgrader_generate_assignment_and_autograde(tmp_path):
    pytest.importorskip("nbgrader")
    nb = new_notebook(cells=[new_markdown_cell("# rms_norm"), new_code_cell("from minfer.lessons import check"),
                             new_code_cell(SOLUTION, metadata={"tags": ["solution"]}),
                             new_code_cell('check("model.rms_norm", rms_norm)')])
    (tmp_path / "source" / "l01").mkdir(parents=True)
    nbformat.write(nbgrader_notebook(nb), tmp_path / "source" / "l01" / "l01.ipynb")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    nbgrader = [sys.executable, "-m", "nbgrader"]
    proc = subprocess.run(nbgrader + ["generate_assignment", "l01", "--force"], **run)
    assert proc.returncode == 0, proc.stderr
    release = nbformat.read(tmp_path / "release" / "l01" / "l01.ipynb", as_version=4)
    assert "rsqrt" not in release.cells[2].source and "NotImplementedError" in release.cells[2].source
    assert "HIDDEN" not in release.cells[3].source and "_minfer_check" not in release.cells[3].source
    for student, source in (("alice", SOLUTION), ("bob", None), ("carol", LYING_CHECK + WRONG)):
        sub = nbformat.read(tmp_path / "release" / "l01" / "l01.ipynb", as_version=4)
        if source is not None:
            sub.cells[2].source = source
        (tmp_path / "submitted" / student / "l01").mkdir(parents=True)
        nbformat.write(sub, tmp_path / "submitted" / student / "l01" / "l01.ipynb")
    proc = subprocess.run(nbgrader + ["autograde", "l01", "--create", "--force"], **run)
    assert proc.returncode == 0, proc.stderr
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission("l01", s).score for s in ("alice", "bob", "carol")}
    assert scores == {"alice": 1.0, "bob": 0.0, "carol": 0.0}
