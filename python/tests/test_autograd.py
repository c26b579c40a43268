"""Autograd: torch.autograd.gradcheck in float64 for every function and option, the
forward-only path, inplace_backward, and which arguments get gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import softce
from conftest import assert_close

g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def probs(*shape, dim=1):
    return torch.softmax(randn(*shape) * 2, dim)


N, C, D = 3, 5, 2
X = randn(N, C, D)
P = probs(N, C, D)
INDEX = torch.randint(0, C, (N, D), generator=g)
INDEX[0, 0] = -100
WEIGHT = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
MASK = torch.tensor([[True, False], [True, True], [False, True]])
TOPK_INDICES = torch.stack([torch.randperm(C, generator=g)[:2] for _ in range(N * D)]).view(N, D, 2)
TOPK_VALUES = torch.softmax(randn(N, D, 2), -1) * 0.8
TEACHER = randn(N, C, D) * 2

CASES = {
    # name: (function of the input, input)
    **{f"ce_index_{r}": (lambda x, r=r: softce.cross_entropy(x, INDEX, WEIGHT, reduction=r,
                                                            label_smoothing=0.1), X)
       for r in ["mean", "sum", "none"]},
    **{f"ce_probs_{r}": (lambda x, r=r: softce.cross_entropy(x, P, WEIGHT, reduction=r,
                                                            label_smoothing=0.2, mask=MASK), X)
       for r in ["mean", "sum", "none"]},
    "ce_vector": (lambda x: softce.cross_entropy(x, torch.tensor(2)), randn(C)),
    "ce_topk": (lambda x: softce.cross_entropy(x, softce.TopK(TOPK_INDICES, TOPK_VALUES),
                                               reduction="none"), X),
    "ce_topk_tail": (lambda x: softce.cross_entropy(
        x, softce.TopK(TOPK_INDICES, TOPK_VALUES, tail=True)), X),
    **{f"kl_{r}_{lt}": (lambda x, r=r, lt=lt: softce.kl_div(
        x, P.log() if lt else P, reduction=r, log_target=lt), torch.log_softmax(X, 1))
       for r in ["mean", "sum", "none", "batchmean"] for lt in [False, True]},
    **{f"bce_{r}": (lambda x, r=r: softce.binary_cross_entropy_with_logits(
        x, P, weight=WEIGHT.view(C, 1), reduction=r, pos_weight=WEIGHT[:D] * 2), X)
       for r in ["mean", "sum", "none"]},
    **{f"distill_{d}_{b}_{r}": (lambda x, d=d, b=b, r=r: softce.distillation_loss(
        x, TEACHER, temperature=1.7, divergence=d, beta=b,
        reduction=r, mask=MASK, dim=1), X)
       for d, b in [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
       for r in ["batchmean", "none"]},
    "distill_topk": (lambda x: softce.distillation_loss(
        x, softce.TopK(TOPK_INDICES, TOPK_VALUES), temperature=2.0, reduction="sum", dim=1),
        X),
    "distill_topk_tail": (lambda x: softce.distillation_loss(
        x, softce.TopK(TOPK_INDICES, TOPK_VALUES, tail=True), dim=1), X),
    **{f"cewp_{r}": (lambda x, r=r: softce.cross_entropy_with_probs(
        x, P[:, :, 0], WEIGHT, reduction=r), randn(N, C)) for r in ["mean", "sum", "none"]},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64(name):
    fn, x = CASES[name]
    x = x.detach().clone().requires_grad_()
    # Also scale the loss so that backward sees an upstream gradient other than 1.
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradcheck(lambda x: 2.5 * fn(x), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["ce_index_mean", "ce_probs_none", "kl_sum_False",
                                  "bce_none", "distill_jsd_0.3_batchmean", "cewp_mean"])
def test_gradcheck_through_custom_ops(name):
    """The torch.compile path: the softce::* custom operators with registered autograd."""
    fn, x = CASES[name]
    x = x.detach().clone().requires_grad_()
    from softce import _torch

    original = _torch._is_compiling
    _torch._is_compiling = lambda: True  # route eager calls through torch.ops.softce.*
    try:
        loss = fn(x)
        assert "softce" in loss.grad_fn.name()  # GeneratedBackwardFor_softce_..._default
        assert gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    finally:
        _torch._is_compiling = original


def test_custom_ops_are_registered_and_pass_opcheck():
    x = randn(4, C).requires_grad_()
    t = torch.randint(0, C, (4,), generator=g)
    for op, args in [
        (torch.ops.softce.cross_entropy.default,
         (x, t, None, False, WEIGHT, -100, "mean", 0.1, None, True)),
        (torch.ops.softce.cross_entropy.default,
         (x, probs(4, C), None, False, None, -100, "none", 0.0, None, True)),
        (torch.ops.softce.kl_div.default, (x, probs(4, C), "batchmean", False, True)),
        (torch.ops.softce.binary_cross_entropy_with_logits.default,
         (x, probs(4, C), None, WEIGHT, "none", True)),
        (torch.ops.softce.distillation_loss.default,
         (x, randn(4, C), None, False, 2.0, "jsd", 0.4, "batchmean", None, True)),
        (torch.ops.softce.cross_entropy_with_probs.default,
         (x, probs(4, C), None, "sum", True)),
        (torch.ops.softce.cross_entropy_with_probs.default,  # forward only
         (x.detach(), probs(4, C), None, "sum", False)),
    ]:
        torch.library.opcheck(op, args)


def test_no_graph_and_no_gradient_work_without_requires_grad():
    x = randn(N, C, D)
    loss = softce.cross_entropy(x, P)
    assert loss.grad_fn is None and not loss.requires_grad
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        loss = softce.cross_entropy(xg, P)
    assert loss.grad_fn is None
    assert_close(loss, F.cross_entropy(x, P))


def test_return_grad_gives_the_gradient_without_a_graph():
    x = randn(N, C, D).requires_grad_()
    loss, grad = softce.cross_entropy(x, P, return_grad=True)
    assert loss.grad_fn is None and grad.dtype == x.dtype
    expected = torch.autograd.grad(F.cross_entropy(x, P), x)[0]
    assert_close(grad, expected)


def test_backward_repeated_with_retain_graph():
    """The stored gradient handed on as is (upstream 1) must not be mutated by later
    accumulation into .grad."""
    x = randn(N, C, D).requires_grad_()
    loss = softce.cross_entropy(x, P)
    for _ in range(3):
        loss.backward(retain_graph=True)
    first = x.grad.clone() / 3
    (2 * loss).backward()
    assert_close(x.grad, 5 * first)
    assert_close(first, torch.autograd.grad(F.cross_entropy(x, P), x)[0])


def test_gradient_is_stored_not_recomputed_and_passed_through_when_upstream_is_one():
    x = randn(N, C, D).requires_grad_()
    loss = softce.cross_entropy(x, P)
    (grad,) = torch.autograd.grad(loss, x)
    (again,) = torch.autograd.grad(softce.cross_entropy(x, P), x)
    assert torch.equal(grad, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_name", ["ce", "kl", "bce", "distill"])
def test_inplace_backward(dtype, loss_name):
    """inplace_backward writes the gradient over the logits; results are unchanged."""
    linear = torch.nn.Linear(6, C).to(dtype)
    features = torch.randn(8, 6, generator=g).to(dtype)
    target = torch.softmax(torch.randn(8, C, generator=g), 1).to(dtype)
    fn = {
        "ce": lambda x, **kw: softce.cross_entropy(x, target, **kw),
        "kl": lambda x, **kw: softce.kl_div(x, target, **kw),
        "bce": lambda x, **kw: softce.binary_cross_entropy_with_logits(x, target, **kw),
        "distill": lambda x, **kw: softce.distillation_loss(x, target * 3, **kw),
    }[loss_name]
    results = []
    for inplace in [False, True]:
        linear.zero_grad()
        logits = linear(features)
        loss = fn(logits, inplace_backward=inplace)
        loss.backward()
        results.append((loss.detach(), linear.weight.grad.clone(), logits.detach().clone()))
    (loss0, grad0, logits0), (loss1, grad1, logits1) = results
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
    assert not torch.equal(logits0, logits1), "the logits were overwritten"


def test_inplace_backward_is_caught_when_the_logits_are_needed_elsewhere():
    z = randn(N, C).requires_grad_()
    logits = torch.exp(z)  # exp saves its output for backward
    loss = softce.cross_entropy(logits, probs(N, C), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_gradient_dtype_follows_input():
    for dtype in [torch.float32, torch.float64, torch.bfloat16, torch.float16]:
        x = torch.randn(3, 4).to(dtype).requires_grad_()
        softce.cross_entropy(x, torch.tensor([0, 1, 2])).backward()
        assert x.grad.dtype == dtype


def test_every_float_argument_is_differentiable():
    """Targets, weights and pos_weight get gradients equal to torch's (the full set of
    cases, with gradcheck and double backward, is in test_higher_order.py)."""
    x = randn(N, C).requires_grad_()
    q = probs(N, C)
    for name, call, reference in [
        ("target", lambda t: softce.cross_entropy(x, t), lambda t: F.cross_entropy(x, t)),
        ("target", lambda t: softce.kl_div(x, t), lambda t: F.kl_div(x, t)),
        ("target", lambda t: softce.binary_cross_entropy_with_logits(x, t),
         lambda t: F.binary_cross_entropy_with_logits(x, t)),
        ("weight", lambda w: softce.cross_entropy(x, q, w[0]),
         lambda w: F.cross_entropy(x, q, w[0])),
        ("pos_weight", lambda w: softce.binary_cross_entropy_with_logits(
            x, P[:, :, 0], pos_weight=w[0]),
         # torch refuses a pos_weight that requires grad: its formula, written out
         lambda w: ((1 - P[:, :, 0]) * x + (1 + (w[0] - 1) * P[:, :, 0])
                    * F.softplus(-x)).mean()),
    ]:
        t = probs(N, C).requires_grad_()
        got = torch.autograd.grad(call(t), (x, t))
        expected = torch.autograd.grad(reference(t), (x, t))
        for a, b in zip(got, expected):
            assert_close(a, b)
        with torch.no_grad():
            assert call(t).grad_fn is None  # fine without grad mode
