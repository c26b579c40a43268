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


# ---------------------------------------------------------------------------------------
# docs/semantics.md "Error messages": every quoted text is what the code produces

def _semantics_error_lines():
    text = (ROOT / "docs/semantics.md").read_text()
    section = text[text.index("## Error messages"):]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def _produced_errors():
    """The message of each call below (NumPy inputs: the C++ core's texts unchanged)."""
    import numpy as np

    import softce

    x = np.zeros((4, 10), np.float32)
    probs = np.full((4, 10), 0.1, np.float32)
    calls = [
        lambda: softce.cross_entropy(x, np.zeros(5, np.int64)),
        lambda: softce.cross_entropy(x, probs, label_smoothing=1.5),
        lambda: softce.cross_entropy(x, np.array([0, 1, 2, 12])),
        lambda: softce.cross_entropy(x, softce.TopK(np.array([[7, 7]] * 4),
                                                    np.full((4, 2), 0.1, np.float32))),
        lambda: softce._core.cross_entropy(x, np.zeros(4, np.int64), None, -100, "mean", 0.0,
                                           None, None, None, np.zeros((4, 10), np.float32)),
        lambda: softce.kl_div(x, np.zeros((4, 9), np.float32)),
        lambda: softce.distillation_loss(x, x, temperature=0),
        lambda: softce.distillation_loss(x, x, beta=2),
        lambda: softce.cross_entropy(x, np.zeros(4, np.int64), reduction="avg"),
        lambda: softce.distillation_loss(x, x, divergence="x"),
    ]
    messages = []
    for call in calls:
        with pytest.raises((ValueError, IndexError, TypeError)) as info:
            call()
        messages.append(str(info.value))
    return messages


def test_every_error_text_quoted_in_semantics_md_is_produced():
    quoted = _semantics_error_lines()
    assert len(quoted) >= 8
    produced = _produced_errors()
    missing = [line for line in quoted if line not in produced]
    assert not missing, f"quoted in docs/semantics.md but not produced: {missing}; produced: {produced}"


def test_one_version_everywhere():
    """CMakeLists.txt's project() version is the package's, softce.__version__ and the
    program's (`softce --version`)."""
    import importlib.metadata
    import shutil
    import subprocess

    import softce

    cmake = re.search(r"project\(softce VERSION ([0-9.]+)", (ROOT / "CMakeLists.txt").read_text())
    assert cmake is not None
    assert softce.__version__ == cmake.group(1)
    assert importlib.metadata.version("softce") == cmake.group(1)
    assert not re.search(r'^version\s*=', (ROOT / "pyproject.toml").read_text(), re.M)
    program = shutil.which("softce")
    if program is not None:  # installed with the package (pip install .)
        out = subprocess.run([program, "--version"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith(f"softce {cmake.group(1)} ")
