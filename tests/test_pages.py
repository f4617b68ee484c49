"""``import minfer`` asks torch's CPU allocator for 2 MB pages (docs/measuring.md), unless the user chose."""
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_import_sets_huge_pages_unless_set(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import minfer, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
