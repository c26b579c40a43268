"""PyTorch's own test samples through softce: every OpInfo sample (op_db) of
nn.functional.cross_entropy, kl_div and binary_cross_entropy_with_logits and every ModuleInfo
sample (module_db) of CrossEntropyLoss, KLDivLoss and BCEWithLogitsLoss, for each dtype torch
lists for them, with the inputs and targets requiring grad as torch's samples make them:
softce's value and the gradients of every argument that requires grad must equal torch's.

No sample is skipped. Where softce's contract deliberately differs from torch
(docs/semantics.md), the sample is compared against the documented value instead, and
counted: kl_div with a NaN input element has a NaN gradient there (torch's gradient −t
ignores the input; torch's KLDivLoss samples contain such NaNs). The counts of samples run
are asserted, so the test cannot pass by running nothing. Dtypes that
softce does not support must raise a clear TypeError."""

import pytest
import torch

try:  # torch.testing._internal imports expecttest; a missing prerequisite fails, never skips
    import expecttest  # noqa: F401
except ImportError as error:
    raise ImportError("test_opinfo.py needs the expecttest package (pip install "
                      "expecttest==0.3.0), which torch.testing._internal imports") from error
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import softce  # noqa: E402
from conftest import TOLERANCE  # noqa: E402

SUPPORTED = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

OPS = {
    "nn.functional.cross_entropy": softce.cross_entropy,
    "nn.functional.kl_div": softce.kl_div,
    "nn.functional.binary_cross_entropy_with_logits": softce.binary_cross_entropy_with_logits,
}
MODULES = {
    torch.nn.CrossEntropyLoss: softce.nn.CrossEntropyLoss,
    torch.nn.KLDivLoss: softce.nn.KLDivLoss,
    torch.nn.BCEWithLogitsLoss: softce.nn.BCEWithLogitsLoss,
}

# samples per (name, dtype) with torch 2.13.0; a change in torch's sample lists shows here
# instead of passing silently with fewer samples
EXPECTED_OP_SAMPLES = {
    "nn.functional.cross_entropy": 21,
    "nn.functional.kl_div": 16,
    "nn.functional.binary_cross_entropy_with_logits": 26,
}
EXPECTED_MODULE_SAMPLES = {"CrossEntropyLoss": 105, "KLDivLoss": 10, "BCEWithLogitsLoss": 6}


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def _differentiable(args, kwargs):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return leaves


def _run(fn, args, kwargs, upstream):
    """(value, gradients of every argument that requires grad) of fn(*args, **kwargs)."""
    args = [_clone(a) for a in args]
    kwargs = {k: _clone(v) for k, v in kwargs.items()}
    out = fn(*args, **kwargs)
    leaves = _differentiable(args, kwargs)
    grads = torch.autograd.grad(out, leaves, upstream(out), allow_unused=True)
    return out.detach(), grads


def _no_worse(name, what, actual, expected, truth, dtype):
    """actual (softce) against expected (torch) in dtype: equal within the dtype's tolerance,
    or, below float64, no further from the float64 truth than torch plus that tolerance
    (torch rounds its intermediates to the dtype, softce computes 16-bit in float32)."""
    tol = TOLERANCE[dtype]
    actual, expected = actual.double(), expected.double()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{name}: {what}: NaN positions differ"
    if dtype == torch.float64 or truth is None:
        torch.testing.assert_close(actual, expected, equal_nan=True, **tol,
                                   msg=lambda m: f"{name}: {what}: {m}")
        return
    truth = truth.double()
    ok = nan | (actual == expected) | (
        (actual - truth).abs() <= (expected - truth).abs() + tol["atol"]
        + tol["rtol"] * truth.abs())
    assert ok.all(), (f"{name}: {what}: softce {actual[~ok].tolist()[:5]}, torch "
                      f"{expected[~ok].tolist()[:5]}, float64 {truth[~ok].tolist()[:5]}")


def _compare(name, ours, theirs, dtype, truth=None):
    (value, grads), (expected, expected_grads) = ours, theirs
    truth_value, truth_grads = truth if truth is not None else (None, [None] * len(grads))
    assert value.dtype == expected.dtype, name
    _no_worse(name, "value", value, expected, truth_value, dtype)
    assert len(grads) == len(expected_grads)
    for i, (a, b, t) in enumerate(zip(grads, expected_grads, truth_grads)):
        assert (a is None) == (b is None), f"{name}: gradient {i}"
        if a is not None:
            assert a.dtype == b.dtype, f"{name}: gradient {i} dtype"
            _no_worse(name, f"gradient {i}", a, b, t, dtype)


def _kl_div_contract(args, kwargs, theirs):
    """torch's result with softce's documented kl_div difference applied: the input's
    gradient is NaN where the input is NaN. Returns (result, whether it changed)."""
    x = args[0]
    if not (x.requires_grad and torch.isnan(x).any()):
        return theirs, False
    value, grads = theirs
    grads = (torch.where(torch.isnan(x), x.detach(), grads[0]),) + tuple(grads[1:])
    return (value, grads), True


def _double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _upstream(seed):
    def make(out):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return make


def _op_cases():
    for op in op_db:
        if op.name in OPS:
            yield pytest.param(op, id=op.name.split(".")[-1])


@pytest.mark.parametrize("dtype", SUPPORTED, ids=str)
@pytest.mark.parametrize("op", list(_op_cases()))
def test_op_db_samples(op, dtype):
    assert dtype in op.supported_dtypes("cpu")
    torch.manual_seed(0)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) == EXPECTED_OP_SAMPLES[op.name]
    ran = with_target_grad = 0
    for i, sample in enumerate(samples):
        args = (sample.input, *sample.args)
        name = f"{op.name}[{i}] {dtype} {sample}"
        theirs = _run(op.op, args, sample.kwargs, _upstream(i))
        ours = _run(OPS[op.name], args, sample.kwargs, _upstream(i))
        truth = _run(op.op, [_double(a) for a in args],
                     {k: _double(v) for k, v in sample.kwargs.items()}, _upstream(i))
        if op.name == "nn.functional.kl_div":
            theirs, changed = _kl_div_contract(args, sample.kwargs, theirs)
            truth, _ = _kl_div_contract(args, sample.kwargs, truth)
            assert not changed, "op_db's kl_div samples have no NaN (update the counts)"
        _compare(name, ours, theirs, dtype, truth)
        ran += 1
        with_target_grad += len(_differentiable(args, sample.kwargs)) > 1
    assert ran == len(samples)
    if op.name != "nn.functional.cross_entropy":  # its op_db targets are class indices
        assert with_target_grad == len(samples)


def _module_cases():
    # every dtype torch's ModuleInfo lists for the module (all of them softce's)
    for info in module_db:
        if info.module_cls in MODULES:
            for dtype in info.dtypes:
                assert dtype in SUPPORTED
                yield pytest.param(info, dtype, id=f"{info.module_cls.__name__}-{dtype}")


@pytest.mark.parametrize("info, dtype", list(_module_cases()))
def test_module_db_samples(info, dtype):
    torch.manual_seed(0)  # torch's sample functions draw from the global generator
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=True)
    assert len(samples) == EXPECTED_MODULE_SAMPLES[info.module_cls.__name__]
    ran = adjusted = 0
    for i, sample in enumerate(samples):
        c = sample.constructor_input
        theirs_module = info.module_cls(*c.args, **c.kwargs).to(dtype)
        ours_module = MODULES[info.module_cls](*c.args, **c.kwargs).to(dtype)
        assert isinstance(ours_module, info.module_cls)
        f = sample.forward_input
        name = f"{info.module_cls.__name__}[{i}] {sample.desc} {dtype}"
        theirs = _run(theirs_module, f.args, f.kwargs, _upstream(i))
        ours = _run(ours_module, f.args, f.kwargs, _upstream(i))
        truth = _run(theirs_module.double(), [_double(a) for a in f.args],
                     {k: _double(v) for k, v in f.kwargs.items()}, _upstream(i))
        if info.module_cls is torch.nn.KLDivLoss:
            theirs, changed = _kl_div_contract(f.args, f.kwargs, theirs)
            truth, _ = _kl_div_contract(f.args, f.kwargs, truth)
            adjusted += changed
        _compare(name, ours, theirs, dtype, truth)
        ran += 1
    assert ran == len(samples)
    # only samples with a NaN input are adjusted (torch's KLDivLoss samples take the log of
    # random numbers, some negative), and most are compared as they are
    with_nan_input = sum(bool(torch.isnan(s.forward_input.args[0]).any()) for s in samples)
    assert adjusted == (with_nan_input if info.module_cls is torch.nn.KLDivLoss else 0)
    assert ran - adjusted >= 2


@pytest.mark.parametrize("dtype", [torch.complex128, torch.int32, torch.float8_e4m3fn],
                         ids=str)
@pytest.mark.parametrize("op", list(_op_cases()))
def test_unsupported_dtypes_raise_a_clear_error(op, dtype):
    """Samples converted to a dtype softce does not have: a TypeError naming it."""
    sample = next(iter(op.sample_inputs("cpu", torch.float64, requires_grad=False)))
    x = sample.input.to(dtype)
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in sample.args]
    with pytest.raises(TypeError, match=r"unsupported dtype|expected a float32, float64, "
                       r"bfloat16 or float16 array, got int32"):
        OPS[op.name](x, *args, **sample.kwargs)
