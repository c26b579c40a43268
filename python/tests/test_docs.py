"""Runs the Python code blocks of docs/python.md (and of README.md, which shows the same
examples), so the documented examples keep working."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def code_blocks(name):
    path = ROOT / name
    if not path.exists():
        return []
    return [(f"{name}:{i}", code) for i, code in enumerate(BLOCK.findall(path.read_text()))]


BLOCKS = code_blocks("docs/python.md") + code_blocks("README.md")


def test_docs_have_the_torch_and_numpy_examples():
    names = [name for name, _ in BLOCKS if name.startswith("docs/")]
    assert len(names) >= 2


@pytest.mark.parametrize("name,code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_code_block_runs(name, code, capsys):
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})
