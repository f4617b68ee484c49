"""`minfer bench report`: docs/benchmarks.md made from the benchmarks' JSON files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minfer.bench import report
from minfer.bench.timing import write_json
from minfer.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def test_report_renders_every_fixture_run(tmp_path):
    out = tmp_path / "benchmarks.md"
    assert main(["bench", "report", str(FIXTURES), "--out", str(out)]) == 0
    page = out.read_text()
    # one section per file, in the benchmarks' order, each with command, machine line and date
    assert page.index("## decode") < page.index("## serve") < page.index("## parallel")
    assert "minfer bench decode --max-tokens 64 --repeats 2" in page
    assert "machine: Test CPU 9000, 2 CPUs, 1 torch threads, torch 2.13.0+cpu, cpu, load average 3.5 / 2 / 1.25" in page
    assert "- date: 2026-12-07T10:00:00" in page and "- note: shared machine" in page
    # the figures, formatted per column; a missing value is "-", a bool "yes"
    assert "| cached | 25.16 | 0.084 | 39.7 | 7.55 | 58% | - |" in page
    assert "| naive | 3.33 | 0.106 | 300.3 | 1.00 | - | yes |" in page
    assert "| int8 | 0.266 | 1.260 | 99.2% | 105 |" in page
    assert "| sequential | 233.0 | 20.46 | 5.66 | 16/16 |" in page
    assert "| continuous | 680 | 5200 | 131 | 46.00 | 0.299 |" in page       # nested ttft.median etc.
    assert page.index("## parallel") < page.index("## guidellm")
    assert "| guidellm | 41.00 | 0.640 | 1.025 | 2.5% |" in page               # another load generator's figures
    # every run's top-level settings; a benchmark without a table says where its figures are
    assert "- settings: model smollm2-135m-instruct" in page
    assert "- settings: torch 2.13.0+cpu, tp_decode_speedup 0.55" in page
    assert "(no table for this benchmark: its figures are in the JSON file)" in page
    assert "(command not recorded)" in page and "machine: not recorded" in page


def test_report_prints_to_stdout(capsys):
    assert main(["bench", "report", str(FIXTURES), "--out", "-"]) == 0
    assert capsys.readouterr().out.startswith("# Benchmarks")


@pytest.mark.parametrize("content, message", [(None, "no *.json"), ("{not json", "not JSON"),
                                               ('{"rows": []}', "no \"benchmark\" name")])
def test_bad_folder_is_one_line_error(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "x.json").write_text(content)
    assert main(["bench", "report", str(tmp_path), "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minfer: error:") and message in err and err.count("\n") == 1


def test_missing_folder_names_it(tmp_path, capsys):
    assert main(["bench", "report", str(tmp_path / "nope"), "--out", "-"]) == 2
    assert "nope" in capsys.readouterr().err


def test_write_json_adds_the_envelope(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["minfer", "bench", "kv", "--threads", "1"])
    monkeypatch.setenv("MINFER_BENCH_NOTE", "a busy machine")
    write_json(tmp_path / "kv.json", {"capacity": [{"method": "paged", "max_seqs": 45}]})
    run = json.loads((tmp_path / "kv.json").read_text())
    assert run["command"] == "minfer bench kv --threads 1" and run["benchmark"] == "kv"
    assert run["note"] == "a busy machine" and run["machine"]["cpu_count"] >= 1 and run["date"]
    assert "| paged | 45 |" in report.section({**run, "_file": "kv.json"})


def test_committed_benchmarks_page_is_generated_from_committed_json():
    """docs/benchmarks.md is exactly what `minfer bench report` makes of docs/bench/."""
    runs = report.load_runs(ROOT / "docs" / "bench")
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.render(runs)


def test_readme_headline_figures_are_on_the_benchmarks_page():
    """Every number in the README's results table is printed in docs/benchmarks.md (no hand-typed figure)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows, "the README's Results section has no table"
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for row in rows:
        for number in re.findall(r"\d+(?:\.\d+)?", row):
            assert number in page, f"README figure {number} ({row}) is not in docs/benchmarks.md"
