"""One argument schema per loss (softce._common.LOSSES) and the package's import structure
(issue 10 item 4): every front takes a loss's arguments in the schema's order with the
schema's defaults; the modules import no private name of another; there is no import
cycle; the NumPy path does not import torch."""

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import softce
from softce import _common, _core, _reference, functional

PACKAGE = Path(softce.__file__).resolve().parent
# the modules of the loss fronts (linear.py / linear_nn.py / aggregate.py have owners of
# their own and are checked for cycles only)
FRONTS = ["_common", "functional", "_torch", "distributed", "nn", "_reference",
          "_gradient_cache", "__init__"]
LOSSES = sorted(_common.LOSSES)


def core_parameters(function) -> list:
    """The argument names of a _core function, from nanobind's signature line."""
    signature = function.__doc__.splitlines()[0]
    inside = signature[signature.index("(") + 1:signature.rindex(") ->")]
    return re.findall(r"(?:^|, )(\w+):", inside)


@pytest.mark.parametrize("name", LOSSES)
def test_public_signature_follows_the_schema(name):
    loss = _common.LOSSES[name]
    parameters = inspect.signature(getattr(functional, name)).parameters
    # (in torch's order where torch has the function: BCE's pos_weight comes last there)
    assert list(parameters)[:2] == [loss.input, loss.target]
    for a in loss.args:
        assert parameters[a.name].default == a.default, a.name


@pytest.mark.parametrize("name", LOSSES)
def test_core_functions_follow_the_schema(name):
    loss = _common.LOSSES[name]
    args = [a.name for a in loss.args]
    dim = ["dim"] if loss.class_dim else []
    variants = [(getattr(_core, name), [loss.input, loss.target])]
    if loss.topk:
        variants.append((getattr(_core, name + "_topk"),
                         [loss.input, "indices", "values", "tail"]))
    for function, head in variants:
        got = core_parameters(function)
        assert got[:len(head) + len(args) + 2 + len(dim)] == head + args + ["grad", "losses"] + dim
        if loss.class_parallel:
            parallel = getattr(_core, "class_parallel_" + function.__name__)
            assert core_parameters(parallel) == (["class_offset", "num_classes", "all_reduce"]
                                                 + head + args + ["grad", "losses"] + dim)


@pytest.mark.parametrize("name", LOSSES)
def test_custom_operator_and_reference_follow_the_schema(name):
    loss = _common.LOSSES[name]
    call = ["topk_values", "tail"] if loss.topk else []
    expected = [loss.input, loss.target] + call + [a.name for a in loss.args]
    schema = getattr(torch.ops.softce, name).default._schema
    got = [a.name for a in schema.arguments]
    assert got[:len(expected)] == expected
    assert got[len(expected)] == "compute_grad"
    reference = list(inspect.signature(getattr(_reference, name)).parameters)
    assert len(reference) == len(expected)
    assert reference[len(reference) - len(loss.args):] == [a.name for a in loss.args]


def test_distillation_module_defaults_are_the_schema_s():
    module = softce.nn.DistillationLoss()
    for a in _common.DISTILLATION.args:
        if a.kind == _common.OPTION:
            assert getattr(module, a.name) == a.default


# ---------------------------------------------------------------------------------------
# imports


def module_level_imports(path: Path) -> set:
    """The package's modules `path` imports at import time (statements at top level and
    inside top-level if / try, not inside functions)."""
    found = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import x, y
                    found.update(a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists())
                else:
                    found.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return found


def relative_imports_anywhere(path: Path) -> list:
    return [(node.module, tuple(a.name for a in node.names))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1]


@pytest.mark.parametrize("module", FRONTS)
def test_no_private_name_is_imported_from_another_module(module):
    for source, names in relative_imports_anywhere(PACKAGE / f"{module}.py"):
        if source is None:
            continue  # `from . import _torch`: a module, not a name
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{module} imports {private} from {source}"


@pytest.mark.parametrize("module", FRONTS)
def test_no_private_attribute_of_another_module_is_used(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    modules = {alias.asname or alias.name
               for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
               for alias in node.names}
    used = [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in modules and node.attr.startswith("_")]
    assert not used, f"{module} uses {used}"


def test_the_module_level_import_graph_has_no_cycle():
    graph = {path.stem: module_level_imports(path) for path in PACKAGE.glob("*.py")}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert "functional" not in graph["_common"] and "_torch" not in graph["_common"]
    assert "functional" not in graph["_torch"] and "distributed" not in graph["_torch"]


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("first", ["softce._common", "softce.functional", "softce._torch",
                                   "softce.distributed", "softce.nn", "softce._reference"])
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    """Whatever is imported first, the package imports completely (no partial module)."""
    run_python(f"import {first}\n"
               "import softce, softce.functional, softce._torch, softce.distributed, "
               "softce.nn\n"
               "assert softce.functional.TopK is softce.TopK is softce._common.TopK\n")


def test_numpy_path_imports_neither_torch_nor_the_torch_front():
    out = run_python(
        "import sys, numpy as np, softce.functional as F\n"
        "x = np.zeros((2, 3)); t = np.full((2, 3), 1 / 3)\n"
        "F.cross_entropy(x, t)\n"
        "print(sorted(m for m in ('torch', 'softce._torch', 'softce.distributed', 'softce.nn')"
        " if m in sys.modules))\n")
    assert out.strip() == "[]"


def test_torch_front_does_not_import_the_functional_or_distributed_modules():
    out = run_python(
        "import sys, torch, softce._torch\n"
        "print(sorted(m for m in ('softce.functional', 'softce.distributed')"
        " if m in sys.modules))\n")
    # softce/__init__.py imports functional (the public API); distributed stays out
    assert out.strip() == "['softce.functional']"
