"""Lesson notebooks: every lesson runs, and its student edition fails gracefully.

For every ``lessons/NN_*.ipynb``:
(a) the reference edition runs top to bottom without an error, and every
    ``check(...)`` report in it says passed;
(b) the student edition (solution cells replaced by stubs) still runs to the
    end, and every report says "not implemented yet". This holds only if no
    later cell uses a learner's function (see ``minfer.lessons.notebooks``).

Tests that start a Jupyter kernel are marked ``notebook`` (deselect with
``-m "not notebook"``). The stub and student-edition tests below need no
kernel; ``test_pipeline_end_to_end`` proves the whole chain on a tiny
throwaway notebook.
"""
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minfer.lessons.notebooks import (
    code_hash,
    execute_and_store,
    execute_notebook,
    grader_reports,
    lesson_paths,
    make_student_edition,
    make_stub,
    student_edition_main,
    start_main,
    stored_hash,
    student_notebook,
)

LESSONS_DIR = Path(__file__).resolve().parents[1] / "lessons"
LESSONS = lesson_paths(LESSONS_DIR) if LESSONS_DIR.is_dir() else []
LESSON_PARAMS = [pytest.param(p, id=p.name) for p in LESSONS] or [
    pytest.param(None, id="no-lessons",
                 marks=pytest.mark.skip(reason="no lessons/NN_*.ipynb yet"))]
NOT_IMPLEMENTED = "not implemented yet"


def _has_solution(nb) -> bool:
    return any(c.cell_type == "code" and "solution" in c.metadata.get("tags", [])
               for c in nb.cells)


# ---------------------------------------------------------------- the real lessons


@pytest.mark.notebook
@pytest.mark.parametrize("path", LESSON_PARAMS)
def test_reference_edition_runs_and_passes(path):
    nb = execute_notebook(path, cwd=LESSONS_DIR)
    reports = grader_reports(nb)
    failed = [r for r in reports if "): passed: " not in r.splitlines()[0]]
    assert not failed, "\n\n".join(failed)
    if _has_solution(nb):
        assert reports, f"{path.name} has solution cells but no check(...) report"


@pytest.mark.notebook
@pytest.mark.slow      # executes every student notebook (minutes each); the default run grades the stubs below
@pytest.mark.parametrize("path", LESSON_PARAMS)
def test_student_edition_runs_and_says_not_implemented(path, tmp_path):
    make_student_edition(LESSONS_DIR, tmp_path)
    nb = execute_notebook(tmp_path / path.name, cwd=tmp_path)
    reports = grader_reports(nb)
    unclear = [r for r in reports if NOT_IMPLEMENTED not in r.splitlines()[0]]
    assert not unclear, "\n\n".join(unclear)
    if _has_solution(nbformat.read(path, as_version=4)):
        assert reports, f"{path.name} has solution cells but no check(...) report"


@pytest.mark.parametrize("path", LESSON_PARAMS)
def test_student_edition_graders_say_not_implemented(path):
    """The student edition's stubs, graded as its check cells grade them: every exercise of the
    lesson is found and answers "not implemented yet" (no crash, no pass). Executing the whole
    student notebook is the ``slow`` test above."""
    from minfer.lessons import exercises
    from minfer.lessons.autograde import find_exercise_cells
    from minfer.lessons.grader import grade

    nb = student_notebook(nbformat.read(path, as_version=4))
    cells = find_exercise_cells(nb, lesson=path.stem)
    own = [n for n in exercises.names() if exercises.get(n).lesson == path.stem]
    assert sorted(cells) == sorted(own), f"{path.name}: exercise cells found {sorted(cells)}, registered {own}"
    for name in own:              # (the grade command's own path is tests/test_autograde.py's)
        ex, ns = exercises.get(name), {}
        exec(ex.prelude, ns)
        exec(cells[name], ns)
        verdict = grade(ex, ns[ex.function], forbid_engine=True)
        assert NOT_IMPLEMENTED in verdict.message, (name, verdict.message)


@pytest.mark.parametrize("path", LESSON_PARAMS)
def test_committed_outputs_come_from_the_current_code(path):
    """The outputs a reader sees on the code host were made by the code next to them:
    the stored hash of the code cells matches (re-run `minfer lessons execute PATH`)."""
    nb = nbformat.read(path, as_version=4)
    assert stored_hash(nb) == code_hash(nb), (
        f"{path.name}: code cells changed since its outputs were made; run "
        f"`minfer lessons execute {path.relative_to(LESSONS_DIR.parent)}` and commit")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum(bool(c.outputs) for c in code) >= len(code) // 2, "outputs missing: re-execute"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors


# ---------------------------------------------------------------- a throwaway lesson

SOLUTION = '''\
import torch

def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight'''


def _tiny_lesson(folder: Path) -> Path:
    """One solution cell, one check cell, and later cells that must still run."""
    nb = new_notebook(cells=[
        new_markdown_cell("# 00 · a throwaway lesson"),
        new_code_cell("from minfer.lessons import check"),
        new_code_cell(SOLUTION, metadata={"tags": ["solution"]}),
        new_code_cell('check("model.rms_norm", rms_norm)'),
        new_code_cell("def top_p(logits, top_p):\n    return logits  # wrong on purpose",
                      metadata={"tags": ["solution"],
                                "minfer": {"stub": "def top_p(logits, top_p):\n    "
                                                   "raise NotImplementedError"}}),
        new_code_cell('result = check("sampling.top_p", top_p)\nresult'),
        new_code_cell("from minfer.model import rms_norm as engine_rms_norm\n"
                      "print('the end')"),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "00_tiny.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.notebook
def test_pipeline_end_to_end(tmp_path):
    src = _tiny_lesson(tmp_path / "lessons")

    ref = execute_notebook(src)
    reports = grader_reports(ref)
    assert len(reports) == 2
    assert reports[0].startswith("✅ check('model.rms_norm'): passed")
    assert reports[1].startswith("❌ check('sampling.top_p'): wrong answer from top_p")
    assert "smallest failing example" in reports[1]
    assert ref.cells[-1].outputs[0].text == "the end\n"
    # check() already printed the report: the returned result displays nothing.
    assert [o.output_type for o in ref.cells[5].outputs] == ["stream"]

    out = tmp_path / "student"
    assert make_student_edition(src.parent, out) == [out / src.name]
    student = execute_notebook(out / src.name)
    reports = grader_reports(student)
    assert len(reports) == 2 and all(NOT_IMPLEMENTED in r for r in reports)
    assert "write the body of rms_norm in the cell above" in reports[0]
    assert "write the body of top_p in the cell above" in reports[1]
    assert student.cells[-1].outputs[0].text == "the end\n"


# ---------------------------------------------------------------- no kernel needed


def test_student_edition_replaces_solutions_and_clears_outputs(tmp_path):
    src = _tiny_lesson(tmp_path / "lessons")
    nb = nbformat.read(src, as_version=4)
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", text="✅ check(...)")]
    nb.cells[3].execution_count = 3
    nbformat.write(nb, src)

    (path,) = make_student_edition(src.parent, tmp_path / "student")
    student = nbformat.read(path, as_version=4)
    nbformat.validate(student)
    assert student.cells[2].source == make_stub(SOLUTION)
    assert "xf.pow" not in student.cells[2].source
    assert student.cells[2].metadata["tags"] == ["exercise"]
    assert student.cells[4].source == "def top_p(logits, top_p):\n    raise NotImplementedError"
    assert "minfer" not in student.cells[4].metadata
    assert all(c.outputs == [] and c.execution_count is None
               for c in student.cells if c.cell_type == "code")
    assert student.cells[3].source == nb.cells[3].source
    assert [p.name for p in (tmp_path / "student").iterdir()] == [src.name]   # no temp files


def test_default_stub_keeps_signature_and_docstring():
    assert make_stub(SOLUTION) == (
        "import torch\n\n"
        "def rms_norm(x, weight, eps):\n"
        '    """x * rsqrt(mean(x^2) + eps) * weight over the last dim."""\n'
        "    # YOUR CODE HERE\n"
        "    raise NotImplementedError")


def test_default_stub_handles_decorators_methods_and_one_liners():
    src = ("@staticmethod\n"
           "def f(a,\n      b):  # two lines\n    # a hint\n    return a + b\n\n"
           "def g(x): return x\n\n"
           "class Cache:\n"
           "    \"\"\"Doc.\"\"\"\n"
           "    def append(self, k):\n        self.k = k\n")
    assert make_stub(src) == (
        "@staticmethod\n"
        "def f(a,\n      b):  # two lines\n    # YOUR CODE HERE\n    raise NotImplementedError\n\n"
        "def g(x):\n    # YOUR CODE HERE\n    raise NotImplementedError\n\n"
        "class Cache:\n"
        "    \"\"\"Doc.\"\"\"\n"
        "    def append(self, k):\n        # YOUR CODE HERE\n        raise NotImplementedError")


def test_student_edition_refuses_to_overwrite_the_source(tmp_path):
    src = _tiny_lesson(tmp_path / "lessons")
    before = src.read_bytes()
    with pytest.raises(ValueError, match="source folder"):
        make_student_edition(src.parent, src.parent / ".")
    assert src.read_bytes() == before


def test_student_edition_main(tmp_path, capsys):
    src = _tiny_lesson(tmp_path / "lessons")
    assert student_edition_main(tmp_path / "out", src_dir=src.parent) == 0
    assert "wrote" in capsys.readouterr().out
    assert student_edition_main(src.parent, src_dir=src.parent) == 2
    assert "source folder" in capsys.readouterr().err


def test_student_edition_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    src = _tiny_lesson(tmp_path / "lessons")
    mine = tmp_path / "mine" / src.name
    mine.parent.mkdir()
    mine.write_text("my own work")
    assert student_edition_main(mine.parent, src_dir=src.parent) == 2
    assert "not empty" in capsys.readouterr().err
    assert mine.read_text() == "my own work"
    from minfer.lessons.notebooks import nbgrader_edition_main
    with pytest.raises(ValueError, match="not empty"):
        nbgrader_edition_main(mine.parent, src_dir=src.parent)
    assert mine.read_text() == "my own work"


def test_student_notebook_leaves_the_input_alone():
    nb = nbformat.read(_tiny_lesson_in_memory(), as_version=4)
    before = nbformat.writes(nb)
    student_notebook(nb)
    assert nbformat.writes(nb) == before


def _tiny_lesson_in_memory():
    import io
    nb = new_notebook(cells=[new_code_cell(SOLUTION, metadata={"tags": ["solution"]})])
    return io.StringIO(nbformat.writes(nb))


@pytest.mark.notebook
def test_execute_and_store_writes_outputs_and_hash(tmp_path):
    src = _tiny_lesson(tmp_path / "lessons")
    execute_and_store(src)
    nb = nbformat.read(src, as_version=4)
    assert stored_hash(nb) == code_hash(nb)
    assert nb.cells[-1].outputs[0].text == "the end\n"
    assert all("execution" not in c.metadata for c in nb.cells)
    nb.cells[2].source += "\n# edited"
    assert code_hash(nb) != stored_hash(nb)          # a code edit makes the outputs stale
    nb.cells[0].source += " (prose)"
    nb.cells[2].source = nbformat.read(src, as_version=4).cells[2].source
    assert code_hash(nb) == stored_hash(nb)          # prose edits do not


def test_start_writes_the_student_edition_only(tmp_path, monkeypatch, capsys):
    import minfer.lessons.notebooks as notebooks
    src = _tiny_lesson(tmp_path / "lessons")
    monkeypatch.setattr(notebooks, "default_lessons_dir", lambda: src.parent)
    assert start_main(tmp_path / "mine") == 0
    (path,) = (tmp_path / "mine").iterdir()
    nb = nbformat.read(path, as_version=4)
    assert "xf.pow" not in nbformat.writes(nb) and "NotImplementedError" in nb.cells[2].source
    assert "jupyter lab" in capsys.readouterr().out
    with pytest.raises(ValueError, match="would be overwritten"):
        start_main(tmp_path / "mine")
