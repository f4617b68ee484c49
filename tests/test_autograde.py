"""``minfer lessons grade`` gives the in-notebook ``check``'s verdicts, and survives bad cells.

For every exercise, four cells: the lesson's reference solution (passes), the
student-edition stub (not implemented), a mutated solution (fails with a
counterexample) and one that forwards to the engine (rejected). The grade
command's verdict (``grade_source``, what its child process runs) must equal
``check``'s on each. The full matrix is ``slow``; the default run takes
lesson 01's and 04's exercises, and one end-to-end run of the command with a
hung cell.
"""
import json
import linecache
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from minfer.lessons import check, exercises
from minfer.lessons.autograde import find_exercise_cells, grade_source, source_problem
from minfer.lessons.notebooks import lesson_paths, make_stub

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = {}
for _p in lesson_paths(ROOT / "lessons"):
    SOLUTIONS.update(find_exercise_cells(nbformat.read(_p, as_version=4), lesson=_p.stem))

# One behaviour-changing edit of each reference solution (old text, new text).
MUTATIONS = {
    "model.rms_norm": ("+ eps) * weight", ") * weight"),
    "sampling.top_p": ("torch.cumsum(probs, dim=-1) - probs", "torch.cumsum(probs, dim=-1)"),
    "kv.append": ("end = int(positions[-1]) + 1", "end = int(positions[-1])"),
    "attention.online_softmax_update": ("acc_new = alpha * acc", "acc_new = acc"),
    "paged.append_slots": ("free_blocks[:needed]", "free_blocks[-needed:]"),
    "paged.block_hashes": ("hash_block_tokens(parent,", "hash_block_tokens(None,"),
    "paged.can_append": ("<= num_free_blocks", "< num_free_blocks"),
    "paged.slot_mapping": ("* block_size + p % block_size", "+ p % block_size"),
    "serving.continuous_step": ("seats >= max_num_seqs", "seats > max_num_seqs"),
    "serving.percentile": ("math.floor(r), math.ceil(r)", "math.floor(r), math.floor(r)"),
    "serving.tpot": ("/ (n - 1)", "/ n"),
    "quant.dequantize_int8": ("q.float() * scale", "q.float() / scale"),
    "quant.pack_int4": ("q[..., 0::2] | (q[..., 1::2] << 4)", "(q[..., 0::2] << 4) | q[..., 1::2]"),
    "quant.quantize_int8": ("/ 127", "/ 128"),
    "quant.unpack_int4": ("[low, high]", "[high, low]"),
    "quant.q4k_scales_mins": ("((p[:, j - 4] >> 6) << 4)", "((p[:, j - 4] >> 6) << 2)"),
    "quant.dequantize_q4_k": ("[chunks & 15, chunks >> 4]", "[chunks >> 4, chunks & 15]"),
    "roofline.linear_intensity": ("num_tokens * (in_features + out_features)", "num_tokens * in_features"),
    "attention.window_mask": ("(p - j < window)", "(p - j <= window)"),
    "attention.gqa_attention": ("repeat_interleave(nh // nkv, dim=1)          # (B, nh, S, hd)",
                                "repeat(1, nh // nkv, 1, 1)          # (B, nh, S, hd)"),
    "kv.quantize_int8": ("amax(dim=-1, keepdim=True) / 127", "amax(dim=-1, keepdim=True) / 128"),
    "serving.ttft": ('kind == "token" and rid not in first', 'kind == "token"'),
    "serving.goodput": ("if r[\"finish\"] is None:\n            continue", "if False:\n            continue"),
    "serving.static_step": ("if not batch and waiting", "if waiting"),
    "speculative.accept_reject": ("min(1.0, float(p[x]) / float(q[x]))", "float(p[x]) / float(q[x])"),
    "speculative.ngram_propose": ("i + n:i + n + k]", "i + n:i + n + k - 1]"),
    "generate.greedy_decode": ("len(prompt_ids) + step)", "len(prompt_ids) + step - 1)"),
    "paged.decode_attention": ("g = h // (nh // nkv)", "g = h % nkv"),
    "serving.schedule_step": ("victim = alive.pop()", "victim = alive.pop(i)"),
    "speculative.greedy_loop": ("        if 0 < n == k:", "        if False:"),
    "cost.dollars_per_mtok": ("/ tokens_per_s / 3600", "/ tokens_per_s / 60"),
    "cost.kwh_per_mtok": ("watts / 1000 * hours", "watts * hours"),
    "router.ring_lookup": ("bisect.bisect_left(points, key)", "bisect.bisect_right(points, key)"),
    "compress.distill_kl": ("return temperature ** 2 * ", "return "),
    "compress.medusa_tree_mask": ("mask[:, 0] = True", "mask[0, 0] = True"),
    "compress.h2o_keep": ("key=lambda i: scores[i], reverse=True)", "key=lambda i: scores[i])"),
    "parallel.shard_weight": ('if kind == "column":', 'if kind == "row":'),
    "parallel.allreduce_bytes_per_token": ("2 * num_layers * 2 * (tp - 1)", "2 * num_layers * (tp - 1)"),
    "fusion.qkv_fused": ("torch.cat([wq, wk, wv]", "torch.cat([wq, wv, wk]"),
    "cuda_graph.pad_to_bucket": ("return bucket, bucket - n", "return bucket, n"),
    "roofline.mbu": ("bytes_per_token * tokens_per_s / bandwidth", "bytes_per_token / tokens_per_s / bandwidth"),
    "lookahead.ngram_pool": ("grams[-per_key:]", "grams[:per_key]"),
    "cuda_graph.pad_batch": ("[scratch_slot] * pad", "[0] * pad"),
    "output.stream_cut": ("len(text) - hold", "len(text)"),
    "compress.prune_ffn": (".sort().values", ""),
    "parallel.gpipe_schedule": ("t - s if", "t if"),
    "parallel.kv_handoff_bytes": ("-(-prompt_len // block_size)", "prompt_len // block_size"),
    "parallel.prompt_kv": ("v[:, blocks]", "k[:, blocks]"),
}
FAST = [n for n in sorted(MUTATIONS) if n.startswith(("model.", "sampling.", "paged.slot", "paged.block",
                                                     "generate."))]


def _forwarding(ex) -> str:
    module, _, attr = ex.reference.partition(":")
    return (f"from {module} import {attr} as _engine\n\n"
            f"def {ex.function}(*args):\n    return _engine(*args)\n")


def _cells(name: str) -> dict[str, str]:
    ex = exercises.get(name)
    ref = SOLUTIONS[name]
    old, new = MUTATIONS[name]
    assert old in ref, f"update MUTATIONS[{name!r}]: the solution changed"
    return {"reference": ref, "stub": make_stub(ref), "mutated": ref.replace(old, new),
            "forwarding": _forwarding(ex)}


def _check_in_notebook(name: str, source: str):
    """What the lesson's check cell reports after running ``source`` in the kernel."""
    ex = exercises.get(name)
    ns: dict = {}
    exec(ex.prelude, ns)
    cell = f"<cell {name}>"        # IPython keeps each cell's source in linecache, so do we
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    exec(compile(source, cell, "exec"), ns)
    return check(name, ns[ex.function])


EXPECTED = {"reference": {"passed"}, "stub": {"not_implemented"}, "mutated": {"wrong", "raised"},
            "forwarding": {"engine", "forbidden"}}


def _verdicts_agree(name: str) -> None:
    torch.set_num_threads(1)          # as the lessons and the grade command do
    for kind, source in _cells(name).items():
        graded = grade_source(exercises.get(name), source)
        in_nb = _check_in_notebook(name, source)
        assert graded["status"] in EXPECTED[kind], (kind, graded)
        assert in_nb.status in EXPECTED[kind] | {"engine"}, (kind, in_nb.message)
        assert (graded["status"] == "passed") == bool(in_nb)
        if kind == "mutated":          # the same counterexample, word for word
            assert "smallest" in graded["message"] and graded["message"] == in_nb.message
        if kind == "stub":
            assert "not implemented yet" in graded["message"]
        if kind == "forwarding":
            assert "engine's own implementation" in graded["message"]
            assert "engine's own implementation" in in_nb.message


def test_every_exercise_has_a_solution_and_a_mutation():
    assert set(exercises.names()) == set(MUTATIONS) == set(SOLUTIONS)


def test_each_lesson_finds_only_its_own_exercise_cells():
    """Lesson 09 has an ordinary cell computing ``tpot = ...``: not lesson 05's exercise."""
    nb = nbformat.read(ROOT / "lessons" / "09_the_inference_service.ipynb", as_version=4)
    assert "serving.tpot" in find_exercise_cells(nb)              # every lesson's: a name clash
    own = find_exercise_cells(nb, lesson="09_the_inference_service")
    assert set(own) == {n for n in exercises.names()
                        if exercises.get(n).lesson == "09_the_inference_service"}
    assert "def tpot(" in SOLUTIONS["serving.tpot"]


@pytest.mark.parametrize("name", FAST)
def test_grade_agrees_with_check(name):
    _verdicts_agree(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MUTATIONS) - set(FAST)))
def test_grade_agrees_with_check_everywhere(name):
    _verdicts_agree(name)


def test_source_check_names_imports_of_the_engine_and_refuses_no_honest_code():
    ex = exercises.get("model.rms_norm")
    assert "engine's own implementation" in source_problem(ex, "import minfer.model as m\n")
    assert "engine's own implementation" in source_problem(ex, "from minfer.model import rms_norm\n")
    assert source_problem(ex, "import sys\nn = len(sys.modules)\nfor m in model.modules(): pass\n") is None
    assert source_problem(ex, SOLUTIONS["model.rms_norm"]) is None
    hb = exercises.get("paged.block_hashes")          # its allowed helper may be imported
    assert source_problem(hb, "from minfer.kv.block_pool import hash_block_tokens\n") is None
    assert source_problem(hb, "from minfer.kv.block_pool import block_hashes\n") is not None


def test_the_engine_cannot_be_imported_where_the_learners_code_runs():
    """Hidden from the source check, an import of the engine fails in the learner's process."""
    src = ("exec('from minfer.model import rms_norm as _r', globals())\n"
           "def rms_norm(x, w, eps):\n    return _r(x, w, eps)\n")
    verdict = grade_source(exercises.get("model.rms_norm"), src)
    assert verdict["status"] == "crashed", verdict
    assert "engine's own implementation" in verdict["message"]


def test_a_call_into_the_engine_is_still_named_where_helpers_are_handed_out():
    """Exercises that hand out helpers (the tiny model, the KV cache) run with minfer importable:
    there the watch on calls names the engine function an honest mistake calls."""
    src = ("def greedy_decode(model, prompt_ids, max_new_tokens, eos_id):\n"
           "    _g = __import__('minfer.generate', fromlist=['x']).generate_tokens\n"
           "    _p = __import__('minfer.sampling', fromlist=['x']).SamplingParams\n"
           "    return list(_g(model.inner, list(prompt_ids), _p(temperature=0.0, "
           "max_tokens=max_new_tokens)))\n")
    verdict = grade_source(exercises.get("generate.greedy_decode"), src)
    assert verdict["status"] == "engine", verdict
    assert "engine's own implementation" in verdict["message"]


# ---------------------------------------------------------------- what the notebook means

STUB_TOP_P = "def top_p(logits, top_p):\n    raise NotImplementedError\n"


def _graded(cells: list[str], name: str = "sampling.top_p") -> dict:
    """Grade ``name`` in a notebook of ``cells`` (the first tagged ``exercise``), as the command does."""
    from minfer.lessons.autograde import exercise_cells, judge, notebook_context
    nb = new_notebook(cells=[new_code_cell(cells[0], metadata={"tags": ["exercise"]})]
                      + [new_code_cell(c) for c in cells[1:]])
    found = exercise_cells(nb, lesson=exercises.get(name).lesson).get(name)
    return judge(exercises.get(name), found, notebook_context(nb, skip=found.index) if found else [])


def test_a_function_in_a_new_cell_below_the_stub_is_graded():
    verdict = _graded([STUB_TOP_P, 'check("sampling.top_p", top_p)', SOLUTIONS["sampling.top_p"]])
    assert verdict["status"] == "passed", verdict


def test_the_notebooks_imports_and_constants_run_before_the_function():
    uses_np = ("def rms_norm(x, weight, eps):\n"
               "    s = torch.from_numpy(np.asarray(EPS_SCALE, dtype=np.float32))\n"
               "    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps * s) * weight\n")
    first = "import numpy as np\nfrom minfer.lessons import check\nEPS_SCALE = 1.0\nx = np.ones(3)\n"
    verdict = _graded([uses_np, "model = load_the_model()"], "model.rms_norm")
    assert verdict["status"] == "raised" and "NameError" in verdict["message"]
    from minfer.lessons.autograde import exercise_cells, judge, notebook_context
    nb = new_notebook(cells=[new_code_cell(first), new_code_cell(uses_np, metadata={"tags": ["exercise"]})])
    found = exercise_cells(nb, lesson="01_prefill_and_decode")["model.rms_norm"]
    context = notebook_context(nb, skip=found.index)
    assert [src.strip() for _, src in context] == ["import numpy as np",
                                                   "from minfer.lessons import check", "EPS_SCALE = 1.0"]
    verdict = judge(exercises.get("model.rms_norm"), found, context)
    assert verdict["status"] == "passed", verdict


def test_a_syntax_error_is_reported_with_its_line():
    broken = "def top_p(logits, top_p):\n    keep = logits.clone(\n    return keep\n"
    verdict = _graded([STUB_TOP_P, broken])
    assert verdict["status"] == "syntax", verdict
    assert "not valid Python" in verdict["message"] and "line 2" in verdict["message"]


def test_check_raises_under_the_autograder(monkeypatch, capsys):
    def wrong(x, weight, eps):
        return x
    assert not check("model.rms_norm", wrong, max_examples=5)
    monkeypatch.setenv("MINFER_AUTOGRADE", "1")
    with pytest.raises(AssertionError, match="wrong answer"):
        check("model.rms_norm", wrong, max_examples=5)
    ns = {}
    exec(SOLUTIONS["model.rms_norm"], {"torch": __import__("torch")}, ns)
    assert check("model.rms_norm", ns["rms_norm"], max_examples=5)


def _submission(path: Path, cells: list[str]) -> Path:
    nb = new_notebook(cells=[new_code_cell("import torch")] +
                      [new_code_cell(c, metadata={"tags": ["exercise"]}) for c in cells] +
                      [new_code_cell("def check(*a):\n    return True   # a redefined check changes nothing")])
    nbformat.write(nb, path)
    return path


def test_a_hung_exercise_is_stopped_by_the_timeout():
    import time
    from minfer.lessons.autograde import grade_exercise
    start = time.perf_counter()
    row = grade_exercise(exercises.get("sampling.top_p"), "def top_p(logits, p):\n    while True:\n        pass\n",
                         submission="s.ipynb", timeout=3)
    assert row.status == "timeout" and row.points == 0 and "stopped after 3 s" in row.message
    assert time.perf_counter() - start < 30


@pytest.mark.slow       # waits out a 40 s timeout (generous: a loaded machine grades slowly)
def test_grade_command_end_to_end(tmp_path):
    """A hung exercise is stopped and failed; the others are graded; one table for all."""
    rms, top_p = SOLUTIONS["model.rms_norm"], SOLUTIONS["sampling.top_p"]
    hung = "def top_p(logits, p):\n    while True:\n        pass\n"
    good = _submission(tmp_path / "good.ipynb", [rms, top_p])
    bad = _submission(tmp_path / "bad.ipynb", [rms.replace("+ eps", ""), hung])
    out = tmp_path / "scores.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "minfer.cli", "lessons", "grade", str(good), str(bad),
                           "--json", str(out), "--timeout", "40"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert table["totals"] == {str(good): {"points": 2, "max_points": 2},
                               str(bad): {"points": 0, "max_points": 2}}
    status = {(r["submission"], r["exercise"]): r["status"] for r in table["exercises"]}
    assert status[(str(bad), "model.rms_norm")] == "wrong"
    assert status[(str(bad), "sampling.top_p")] == "timeout"
    assert f"0/2  {bad}" in proc.stdout and "smallest failing example" in proc.stdout


# ---------------------------------------------------------------- a class of ten

HUNG = "    while True:\n        pass\n"


def _edit(lesson: str, changes: dict[str, str], path: Path) -> Path:
    """The reference notebook of ``lesson`` with some exercise cells replaced (by exercise name)."""
    nb = nbformat.read(ROOT / "lessons" / f"{lesson}.ipynb", as_version=4)
    for cell in nb.cells:
        for name, source in changes.items():
            if cell.cell_type == "code" and cell.source == SOLUTIONS[name]:
                cell.source = source
    nbformat.write(nb, path)
    return path


def make_class(folder: Path) -> dict[str, tuple[int, int]]:
    """Ten submissions, right, wrong, stubbed, hung and cheating; returns the expected totals."""
    def stub(n): return make_stub(SOLUTIONS[n])
    def mutated(n): return _cells(n)["mutated"]
    def forwarding(n): return _forwarding(exercises.get(n))
    sneaky = ("exec('from minfer.kv.block_pool import can_append_tokens as _c', globals())\n"
              "def can_append(*args):\n    return _c(*args)\n")
    hung = SOLUTIONS["generate.greedy_decode"].split("    cache = ContiguousKVCache")[0] + HUNG
    plan = {
        "alice": ("01_prefill_and_decode", {}, 2),
        "bob": ("01_prefill_and_decode", {"model.rms_norm": stub("model.rms_norm"),
                                          "sampling.top_p": stub("sampling.top_p")}, 0),
        "carol": ("01_prefill_and_decode", {"model.rms_norm": mutated("model.rms_norm")}, 1),
        "dave": ("01_prefill_and_decode", {"model.rms_norm": forwarding("model.rms_norm"),
                                           "sampling.top_p": forwarding("sampling.top_p")}, 0),
        "erin": ("04_paged_attention", {}, 5),
        "frank": ("04_paged_attention", {"paged.slot_mapping": mutated("paged.slot_mapping"),
                                         "paged.block_hashes": stub("paged.block_hashes")}, 3),
        "grace": ("04_paged_attention", {"paged.can_append": sneaky}, 4),
        "heidi": ("02_kv_cache", {}, 3),
        "ivan": ("02_kv_cache", {"generate.greedy_decode": hung}, 2),
        "judy": ("02_kv_cache", {"generate.greedy_decode": mutated("generate.greedy_decode"),
                                 "kv.append": stub("kv.append")}, 1),
    }
    expected = {}
    for student, (lesson, changes, points) in plan.items():
        path = _edit(lesson, changes, folder / f"{student}_{lesson[:2]}.ipynb")
        expected[str(path)] = (points, len([n for n in exercises.names()
                                            if exercises.get(n).lesson == lesson]))
    return expected


@pytest.mark.slow
def test_grade_a_class_of_ten(tmp_path):
    expected = make_class(tmp_path)
    out = tmp_path / "scores.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "minfer.cli", "lessons", "grade", *expected,
                           "--csv", str(out), "--timeout", "30"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for sub, (got, most) in expected.items():
        assert f"{got}/{most}  {sub}" in proc.stdout, proc.stdout
    assert "engine's own implementation" in proc.stdout and "timeout" in proc.stdout


if __name__ == "__main__":       # python tests/test_autograde.py DIR: write the class, print expected
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for sub, (got, most) in make_class(folder).items():
        print(f"{got}/{most}  {sub}")
