"""minfer.atomic: whole files or nothing, with ordinary permissions."""
import os
import stat

import pytest

from minfer import atomic


def test_write_replaces_whole_file_with_open_mode(tmp_path):
    p = tmp_path / "out.json"
    atomic.write_json(p, {"a": 1})
    assert p.read_text() == '{\n  "a": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask     # not mkstemp's 0600
    assert [q.name for q in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_swaps_and_restores(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "x").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(d) as tmp:
            (tmp / "x").write_text("new")
            raise KeyboardInterrupt
    assert (d / "x").read_text() == "old"
    with atomic.atomic_dir(d) as tmp:
        (tmp / "y").write_text("new")
    assert sorted(q.name for q in d.iterdir()) == ["y"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt"]
