"""Parity with PyTorch's own functions, values and gradients, on randomised cases.

Each case draws a shape ((C,), (N, C), (N, C, d1), (N, C, d1, d2)), a dtype, the optional
arguments torch accepts, and a memory layout (contiguous, strided, permuted); softce and
torch.nn.functional run on the same tensors and must agree on the loss and on the gradient
for a random upstream gradient. float32 / float64 are compared with torch in the same dtype;
bfloat16 / float16 against torch in float64 on the same (rounded) values, because torch
keeps 16-bit intermediates while softce computes in float32.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softce
from conftest import assert_close

DTYPES = [torch.float32] * 5 + [torch.float64] * 2 + [torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


def random_shape(g: np.random.Generator):
    kind = g.integers(4)
    C = int(g.integers(1, 12)) if g.random() < 0.9 else int(g.integers(100, 300))
    if kind == 0:
        return (C,)
    N = int(g.integers(1, 7))
    if kind == 1:
        return (N, C)
    if kind == 2:
        return (N, C, int(g.integers(1, 4)))
    return (N, C, int(g.integers(1, 4)), int(g.integers(1, 3)))


def random_layout(g: np.random.Generator, values: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous, a strided (every other element) or a permuted
    (class dimension last in memory) tensor."""
    kind = g.integers(3)
    if kind == 0 or values.dim() == 0:
        return values.clone()
    if kind == 1:
        wide = torch.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    dims = list(range(values.dim()))
    order = dims[:1] + dims[2:] + dims[1:2] if values.dim() >= 2 else dims
    inverse = list(np.argsort(order))
    return values.permute(order).contiguous().permute(inverse)


def random_logits(g, shape, dtype):
    scale = float(g.choice([0.5, 3.0, 20.0]))
    x = torch.from_numpy(g.standard_normal(shape) * scale).to(dtype)
    return random_layout(g, x).requires_grad_()


def random_probabilities(g, shape, dtype):
    if len(shape) == 0:
        return torch.ones((), dtype=dtype)
    raw = g.exponential(size=shape) ** float(g.choice([1.0, 4.0]))
    raw[g.random(shape) < 0.2] = 0.0  # exact zeros
    axis = 1 if len(shape) >= 2 else 0
    total = raw.sum(axis=axis, keepdims=True)
    total[total == 0] = 1.0
    return random_layout(g, torch.from_numpy(raw / total).to(dtype))


def row_shape(shape):
    return shape[:1] + shape[2:] if len(shape) >= 2 else ()


def upstream(g, loss: torch.Tensor):
    if loss.dim() == 0 and g.random() < 0.5:
        return torch.ones((), dtype=loss.dtype)
    return torch.from_numpy(g.uniform(-2, 2, size=tuple(loss.shape))).to(loss.dtype)


def compare(g, softce_fn, torch_fn, x, dtype, torch_in_float64=False):
    """Runs both on `x` (a leaf requiring grad), compares losses and gradients.
    `torch_in_float64`: torch's function runs in float64 (where its float32 formula loses
    digits that softce keeps, as BCE's (1 - t) x + softplus(-x) at t = 0, x << 0)."""
    if dtype in (torch.bfloat16, torch.float16) or torch_in_float64:
        x_ref = x.detach().double().requires_grad_()
    else:
        x_ref = x.detach().clone().requires_grad_()
    loss = softce_fn(x)
    expected = torch_fn(x_ref)
    assert loss.dtype == x.dtype and loss.shape == expected.shape
    assert_close(loss, expected, dtype)
    grad_out = upstream(g, loss)
    loss.backward(grad_out)
    expected.backward(grad_out.to(expected.dtype))
    assert x.grad.dtype == x.dtype
    # Gradients are compared relative to their largest entry (they are O(1/N) each).
    scale = max(1.0, float(x_ref.grad.abs().max()))
    assert_close(x.grad, x_ref.grad, dtype, scale=scale)


@pytest.mark.parametrize("seed", range(320))
def test_cross_entropy(seed):
    g = np.random.default_rng(seed)
    shape = random_shape(g)
    C = shape[0] if len(shape) == 1 else shape[1]
    dtype = DTYPES[g.integers(len(DTYPES))]
    reduction = REDUCTIONS[g.integers(3)]
    label_smoothing = float(g.choice([0.0, 0.0, g.uniform(0, 1), 1.0], p=[0.4, 0.1, 0.4, 0.1]))
    weight = None
    if g.random() < 0.4:
        weight = torch.from_numpy(g.uniform(0.1, 3.0, size=C)).to(dtype)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    x = random_logits(g, shape, dtype)
    if g.random() < 0.5:  # class indices, some of them ignored
        target = torch.from_numpy(g.integers(0, C, size=row_shape(shape)))
        if g.random() < 0.5:
            ignore_index = int(g.choice([-1, int(g.integers(C))]))
            target[torch.from_numpy(np.asarray(g.random(row_shape(shape)) < 0.3))] = ignore_index
            kwargs["ignore_index"] = ignore_index
    else:  # probabilities (torch rejects ignore_index >= 0 with them)
        target = random_probabilities(g, shape, dtype)
        if g.random() < 0.2:
            kwargs["ignore_index"] = -1
    compare(g,
            lambda x: softce.cross_entropy(x, target, **kwargs),
            lambda x: F.cross_entropy(x, target.to(x.dtype) if target.is_floating_point()
                                      else target,
                                      **dict(kwargs, weight=None if weight is None
                                             else weight.to(x.dtype))),
            x, dtype)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("seed", range(100))
def test_kl_div(seed):
    g = np.random.default_rng(1000 + seed)
    shape = random_shape(g) if g.random() < 0.9 else ()
    dtype = DTYPES[g.integers(len(DTYPES))]
    reduction = ["mean", "sum", "none", "batchmean"][g.integers(4)]
    log_target = bool(g.random() < 0.5)
    x = torch.log_softmax(torch.from_numpy(np.asarray(g.standard_normal(shape) * 2)), -1).to(dtype)
    x = random_layout(g, x).requires_grad_()
    p = random_probabilities(g, shape, dtype)
    target = torch.log(p.double()).to(dtype) if log_target else p
    if log_target:
        target = torch.where(torch.isinf(target), -1e4, target).to(dtype)  # torch NaNs at -inf
    compare(g,
            lambda x: softce.kl_div(x, target, reduction=reduction, log_target=log_target),
            lambda x: F.kl_div(x, target.to(x.dtype), reduction=reduction,
                               log_target=log_target),
            x, dtype)


@pytest.mark.parametrize("seed", range(150))
def test_binary_cross_entropy_with_logits(seed):
    g = np.random.default_rng(2000 + seed)
    shape = random_shape(g)
    dtype = DTYPES[g.integers(len(DTYPES))]
    reduction = REDUCTIONS[g.integers(3)]
    x = random_logits(g, shape, dtype)
    target = random_layout(g, torch.from_numpy(g.uniform(0, 1, size=shape)).to(dtype))
    if g.random() < 0.3:
        target = torch.round(target)  # hard labels
    kwargs = dict(reduction=reduction)
    if g.random() < 0.4:  # any broadcastable shape: full, trailing dims, or (C,)-like
        wshape = shape[int(g.integers(len(shape) + 1)):]
        kwargs["weight"] = torch.from_numpy(g.uniform(0.1, 2, size=wshape)).to(dtype)
    if g.random() < 0.4:
        kwargs["pos_weight"] = torch.from_numpy(g.uniform(0.1, 4, size=shape[-1:])).to(dtype)
    compare(g,
            lambda x: softce.binary_cross_entropy_with_logits(x, target, **kwargs),
            lambda x: F.binary_cross_entropy_with_logits(
                x, target.to(x.dtype), **{k: v.to(x.dtype) if isinstance(v, torch.Tensor)
                                          else v for k, v in kwargs.items()}),
            x, dtype, torch_in_float64=True)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("seed", range(40))
def test_modules_match_torch_modules(seed):
    g = np.random.default_rng(3000 + seed)
    N, C = int(g.integers(1, 6)), int(g.integers(2, 9))
    reduction = REDUCTIONS[g.integers(3)]
    x = random_logits(g, (N, C), torch.float32)
    weight = torch.from_numpy(g.uniform(0.1, 3.0, size=C)).float()
    probs = random_probabilities(g, (N, C), torch.float32)
    pairs = [
        (softce.nn.CrossEntropyLoss(weight, reduction=reduction, label_smoothing=0.1),
         torch.nn.CrossEntropyLoss(weight, reduction=reduction, label_smoothing=0.1),
         torch.from_numpy(g.integers(0, C, size=N))),
        (softce.nn.CrossEntropyLoss(reduction=reduction), torch.nn.CrossEntropyLoss(
            reduction=reduction), probs),
        (softce.nn.KLDivLoss(reduction=reduction), torch.nn.KLDivLoss(reduction=reduction),
         probs),
        (softce.nn.BCEWithLogitsLoss(weight, reduction=reduction, pos_weight=weight),
         torch.nn.BCEWithLogitsLoss(weight, reduction=reduction, pos_weight=weight), probs),
    ]
    for ours, theirs, target in pairs:
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        bce = isinstance(ours, torch.nn.BCEWithLogitsLoss)  # torch's float32 formula cancels
        compare(g, lambda x: ours(x, target),
                lambda x: theirs.double()(x, target.double()) if bce else theirs(x, target),
                x.detach().clone().requires_grad_(), torch.float32, torch_in_float64=bce)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_deprecated_size_average_and_reduce(size_average, reduce):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 4, 2])
    p = torch.softmax(x, 1)
    legacy = size_average is not None or reduce is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = [softce.cross_entropy(x, t, None, size_average, -100, reduce),
                softce.kl_div(x, p, size_average, reduce),
                softce.binary_cross_entropy_with_logits(x, p, None, size_average, reduce),
                softce.nn.CrossEntropyLoss(None, size_average, -100, reduce)(x, t)]
    assert bool(caught) == legacy  # torch warns about the deprecated arguments, so do we
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [F.cross_entropy(x, t, None, size_average, -100, reduce),
                  F.kl_div(x, p, size_average, reduce),
                  F.binary_cross_entropy_with_logits(x, p, None, size_average, reduce),
                  torch.nn.CrossEntropyLoss(None, size_average, -100, reduce)(x, t)]
    for a, b in zip(ours, theirs):
        assert_close(a, b)
