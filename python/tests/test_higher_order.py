"""Double backward (create_graph=True) and gradients with respect to targets, teacher logits,
TopK values and weights: gradcheck and gradgradcheck in float64 for every loss and option,
in the eager autograd.Function path and through the softce::* custom operators; Hessians
against torch's; R-Drop; dim= of distillation_loss against TRL's formula; in-place rules."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import softce
from conftest import assert_close
from test_extensions import generalized_jsd_loss

g = torch.Generator().manual_seed(11)


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
TOPK_INDICES = torch.stack([torch.randperm(C, generator=g)[:2]
                            for _ in range(N * D)]).view(N, D, 2)
TOPK_VALUES = torch.softmax(randn(N, D, 2), -1) * 0.8
TEACHER = randn(N, C, D) * 2
LOGP = torch.log_softmax(X, 1)

# name: (function of its differentiable arguments, those arguments); every argument
# requires grad in the tests (the input first)
CASES = {
    **{f"ce_index_{r}": (lambda x, w, r=r: softce.cross_entropy(
        x, INDEX, w, reduction=r, label_smoothing=0.1), (X, WEIGHT))
       for r in ["mean", "sum", "none"]},
    "ce_index_plain": (lambda x: softce.cross_entropy(x, INDEX), (X,)),
    **{f"ce_probs_{r}": (lambda x, t, w, r=r: softce.cross_entropy(
        x, t, w, reduction=r, label_smoothing=0.2, mask=MASK), (X, P, WEIGHT))
       for r in ["mean", "sum", "none"]},
    "ce_probs_nomask": (lambda x, t: softce.cross_entropy(x, t), (X, P)),
    "ce_vector": (lambda x: softce.cross_entropy(x, torch.tensor(2)), (randn(C),)),
    "ce_vector_probs": (lambda x, t: softce.cross_entropy(x, t), (randn(C), probs(C, dim=0))),
    "ce_topk": (lambda x, v: softce.cross_entropy(x, softce.TopK(TOPK_INDICES, v),
                                                  reduction="none"), (X, TOPK_VALUES)),
    "ce_topk_weight": (lambda x, v, w: softce.cross_entropy(
        x, softce.TopK(TOPK_INDICES, v), w, label_smoothing=0.1, mask=MASK),
        (X, TOPK_VALUES, WEIGHT)),
    "ce_topk_tail": (lambda x, v: softce.cross_entropy(
        x, softce.TopK(TOPK_INDICES, v, tail=True)), (X, TOPK_VALUES)),
    **{f"kl_{r}_{lt}": (lambda x, t, r=r, lt=lt: softce.kl_div(
        x, t, reduction=r, log_target=lt), (LOGP, P.log() if lt else P))
       for r in ["mean", "sum", "none", "batchmean"] for lt in [False, True]},
    **{f"bce_{r}": (lambda x, t, w, pw, r=r: softce.binary_cross_entropy_with_logits(
        x, t, weight=w, reduction=r, pos_weight=pw), (X, P, WEIGHT.view(C, 1), WEIGHT[:D] * 2))
       for r in ["mean", "sum", "none"]},
    "bce_plain": (lambda x, t: softce.binary_cross_entropy_with_logits(x, t), (X, P)),
    **{f"distill_{d}_{b}_{r}": (lambda x, z, d=d, b=b, r=r: softce.distillation_loss(
        x, z, temperature=1.7, divergence=d, beta=b, reduction=r, mask=MASK, dim=1),
        (X, TEACHER))
       for d, b in [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
       for r in ["batchmean", "none", "sum", "mean"]},
    "distill_topk": (lambda x, v: softce.distillation_loss(
        x, softce.TopK(TOPK_INDICES, v), temperature=2.0, reduction="sum", dim=1),
        (X, TOPK_VALUES)),
    "distill_topk_tail": (lambda x, v: softce.distillation_loss(
        x, softce.TopK(TOPK_INDICES, v, tail=True), temperature=1.5, dim=1), (X, TOPK_VALUES)),
    **{f"cewp_{r}": (lambda x, t, w, r=r: softce.cross_entropy_with_probs(
        x, t, w, reduction=r), (randn(N, C), probs(N, C), WEIGHT))
       for r in ["mean", "sum", "none"]},
}

TOL = dict(eps=1e-6, atol=1e-6, rtol=1e-4)


def leaves(args):
    return tuple(a.detach().clone().requires_grad_() for a in args)


@pytest.fixture(params=["eager", "custom_op"])
def path(request, monkeypatch):
    """eager: the autograd.Function; custom_op: the softce::* operators (the torch.compile
    path, called eagerly so that double backward can be checked)."""
    if request.param == "custom_op":
        from softce import _torch

        monkeypatch.setattr(_torch, "_is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_every_argument(name, path):
    fn, args = CASES[name]
    args = leaves(args)
    loss = fn(*args)
    if path == "custom_op":
        assert "softce" in loss.grad_fn.name()
    assert gradcheck(fn, args, **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradgradcheck_every_argument(name, path):
    fn, args = CASES[name]
    assert gradgradcheck(fn, leaves(args), **TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradgradcheck_input_only(name):
    """Double backward when only the input requires grad (targets fixed)."""
    fn, args = CASES[name]
    x = args[0].detach().clone().requires_grad_()
    assert gradgradcheck(lambda x: fn(x, *args[1:]), (x,), **TOL)


TORCH_EQUIVALENTS = {
    "ce_index": (lambda x: softce.cross_entropy(x, INDEX, WEIGHT, label_smoothing=0.1),
                 lambda x: F.cross_entropy(x, INDEX, WEIGHT, label_smoothing=0.1)),
    "ce_probs": (lambda x: softce.cross_entropy(x, P, WEIGHT, label_smoothing=0.2),
                 lambda x: F.cross_entropy(x, P, WEIGHT, label_smoothing=0.2)),
    "kl": (lambda x: softce.kl_div(torch.log_softmax(x, 1), P, reduction="batchmean"),
           lambda x: F.kl_div(torch.log_softmax(x, 1), P, reduction="batchmean")),
    "bce": (lambda x: softce.binary_cross_entropy_with_logits(x, P, pos_weight=WEIGHT[:D]),
            lambda x: F.binary_cross_entropy_with_logits(x, P, pos_weight=WEIGHT[:D])),
}


@pytest.mark.parametrize("name", sorted(TORCH_EQUIVALENTS))
def test_hessian_equals_torch(name, path):
    ours, theirs = TORCH_EQUIVALENTS[name]
    h = torch.autograd.functional.hessian(ours, X)
    expected = torch.autograd.functional.hessian(theirs, X)
    assert expected.abs().sum() > 0
    assert_close(h, expected, rtol=1e-9, atol=1e-11)


def test_gradient_penalty_equals_torch():
    """The classic use: a penalty on the norm of the input gradient, backpropagated."""
    lin = torch.nn.Linear(4, C).double()
    features = randn(6, 4).requires_grad_()
    target = probs(6, C)
    results = []
    for loss_fn in (softce.cross_entropy, F.cross_entropy):
        lin.zero_grad()
        features.grad = None
        loss = loss_fn(lin(features), target)
        (gx,) = torch.autograd.grad(loss, features, create_graph=True)
        (loss + gx.pow(2).sum()).backward()
        results.append((lin.weight.grad.clone(), features.grad.clone()))
    for a, b in zip(*results):
        assert_close(a, b)


def test_rdrop_symmetric_kl_between_two_trainable_branches():
    a = randn(4, C).requires_grad_()
    b = randn(4, C).requires_grad_()
    loss = (softce.distillation_loss(a, b) + softce.distillation_loss(b, a)) / 2
    got = torch.autograd.grad(loss, (a, b))

    def kl(student, teacher):
        return F.kl_div(torch.log_softmax(student, 1), torch.log_softmax(teacher, 1),
                        reduction="batchmean", log_target=True)

    expected = torch.autograd.grad((kl(a, b) + kl(b, a)) / 2, (a, b))
    for x, y in zip(got, expected):
        assert_close(x, y)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0


def test_same_tensor_as_student_and_teacher():
    """distillation_loss(x, x) with x requiring grad: both parts of the gradient, each once."""
    x = randn(4, C).requires_grad_()
    assert gradcheck(lambda x: softce.distillation_loss(x, x * 0.5, divergence="jsd"), (x,),
                     **TOL)
    assert gradgradcheck(lambda x: softce.distillation_loss(x, x * 0.5, divergence="jsd"), (x,),
                         **TOL)


def test_fast_path_is_used_without_create_graph():
    """Without create_graph and with only the input requiring grad, backward hands on the
    fused kernel's gradient (bitwise), not a recomputation."""
    x = X.clone().requires_grad_()
    (grad,) = torch.autograd.grad(softce.cross_entropy(x, P), x)
    _, stored = softce.cross_entropy(x, P, return_grad=True)
    assert torch.equal(grad, stored)
    (grad2,) = torch.autograd.grad(softce.cross_entropy(x, P), x, create_graph=True)
    assert grad2.requires_grad
    assert_close(grad2, stored)


# cases whose second argument is a dense target or teacher: the kernel computes its
# gradient in the same pass (outputs.grad_target)
FUSED_TARGET_CASES = sorted(name for name, (_, args) in CASES.items()
                            if len(args) == 2 and "topk" not in name and "index" not in name)


@pytest.mark.parametrize("name", FUSED_TARGET_CASES)
def test_first_order_target_gradient_comes_from_the_kernel(name, monkeypatch):
    """First order, the input's and the target's gradients are the kernel's: with every
    reference expression made to fail, backward still works, and it equals the reference's
    gradient (create_graph=True goes through the expression)."""
    fn, args = CASES[name]
    a = leaves(args)
    expected = torch.autograd.grad(fn(*a).sum(), a, create_graph=True)
    from softce import _reference

    def refuse(*_args, **_kwargs):
        raise AssertionError("the reference expression was used")

    for function in ("cross_entropy", "cross_entropy_with_probs", "kl_div",
                     "binary_cross_entropy_with_logits", "distillation_loss"):
        monkeypatch.setattr(_reference, function, refuse)
    got = torch.autograd.grad(fn(*a).sum(), a)
    for x, y in zip(got, expected):
        assert_close(x, y.detach(), rtol=1e-12, atol=1e-14)
    assert got[1].abs().sum() > 0
    # only the target requiring grad
    t = args[1].detach().clone().requires_grad_()
    (only,) = torch.autograd.grad(fn(args[0], t).sum(), t)
    assert_close(only, expected[1].detach(), rtol=1e-12, atol=1e-14)


def test_target_gradient_float32_matches_torch():
    """float32 target gradient as accurate as torch's own (-log q near the max class)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 5, generator=gen) * 8
    t = torch.softmax(torch.randn(64, 3, 5, generator=gen), 1)
    w = torch.randn(3, generator=gen)
    grads = []
    for fn, dtype in ((softce.cross_entropy, torch.float32), (F.cross_entropy, torch.float32),
                      (F.cross_entropy, torch.float64)):
        tt = t.to(dtype).requires_grad_()
        (gt,) = torch.autograd.grad(fn(x.to(dtype), tt, w.to(dtype), reduction="sum"), tt)
        grads.append(gt.double())
    ours, theirs, exact = grads
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-7


def test_create_graph_after_inplace_backward_is_refused():
    x = X.clone().requires_grad_()
    logits = x * 1
    loss = softce.cross_entropy(logits, P, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True overwrote"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_inplace_with_a_target_that_requires_grad_is_refused():
    logits = X.clone().requires_grad_() * 1
    with pytest.raises(ValueError, match="cannot be combined with a target that requires"):
        softce.cross_entropy(logits, P.clone().requires_grad_(), inplace_backward=True)


def test_class_parallel_double_backward_is_refused_not_dropped():
    """Functions without a reference (the class-parallel path) raise under create_graph."""
    from softce import _torch

    x = X.clone().requires_grad_()
    call = lambda xd, grad, losses: softce._core.cross_entropy(  # noqa: E731
        xd, _torch._dl(P), None, -100, "mean", 0.0, None, grad, losses)
    loss = _torch._eager("cross_entropy", x, "mean", True, call, False, False)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_custom_ops_with_targets_requiring_grad_pass_opcheck():
    """The operators' autograd (incl. the traced backward through the torch expression)
    under torch.library.opcheck, with targets / teacher / pos_weight requiring grad."""
    x = randn(4, C).requires_grad_()
    p = probs(4, C).requires_grad_()
    z = randn(4, C).requires_grad_()
    pos_weight = (WEIGHT + 0).requires_grad_()
    for op, args in [
        (torch.ops.softce.cross_entropy.default,
         (x, p, None, False, WEIGHT, -100, "mean", 0.1, None, True)),
        (torch.ops.softce.cross_entropy.default,  # only the target requires grad
         (x.detach(), p, None, False, None, -100, "none", 0.0, None, False)),
        (torch.ops.softce.cross_entropy.default,  # TopK with tail
         (x, torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]]),
          (torch.softmax(randn(4, 2), 1) * 0.8).requires_grad_(), True, None, -100, "sum",
          0.0, None, True)),
        (torch.ops.softce.kl_div.default, (x, p, "batchmean", False, True)),
        (torch.ops.softce.binary_cross_entropy_with_logits.default,
         (x, p, None, pos_weight, "none", True)),
        (torch.ops.softce.distillation_loss.default,
         (x, z, None, False, 2.0, "jsd", 0.4, "batchmean", None, True)),
        (torch.ops.softce.cross_entropy_with_probs.default, (x, p, WEIGHT, "sum", True)),
    ]:
        torch.library.opcheck(op, args)


def test_target_gradient_under_torch_compile():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, t, z):
        return softce.cross_entropy(x, t) + softce.distillation_loss(x, z, divergence="jsd")

    x, t, z = leaves((X[:, :, 0], P[:, :, 0], TEACHER[:, :, 0]))
    got = torch.autograd.grad(f(x, t, z), (x, t, z))
    x2, t2, z2 = leaves((x, t, z))
    expected = torch.autograd.grad(
        F.cross_entropy(x2, t2) + generalized_jsd_loss(x2, z2, 0.5, 1.0, "batchmean"),
        (x2, t2, z2))
    for a, b in zip(got, expected):
        assert_close(a, b)


# ---------------------------------------------------------------------------------------
# dim= of distillation_loss


def trl_generalized_jsd(student, teacher, labels, beta, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss with labels, (batch, sequence, vocabulary)."""
    mask = labels != -100
    per_token = generalized_jsd_loss(student[mask], teacher[mask], beta, temperature, "sum")
    return per_token / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_dim_minus_one_matches_trl(beta, temperature):
    B, S, V = 2, 4, 7
    student = randn(B, S, V).requires_grad_()
    teacher = randn(B, S, V)
    labels = torch.tensor([[5, -100, 3, 2], [1, 1, -100, -100]])
    loss = softce.distillation_loss(student, teacher, divergence="jsd", beta=beta,
                                    temperature=temperature, mask=labels != -100, dim=-1)
    # softce multiplies by T² (the usual KD scaling); TRL does not
    expected = temperature ** 2 * trl_generalized_jsd(student, teacher, labels, beta,
                                                      temperature)
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(loss, student)[0],
                 torch.autograd.grad(expected, student)[0])


def test_distillation_dim_layouts_agree_and_3d_needs_dim():
    student, teacher = randn(2, 3, 6), randn(2, 3, 6)
    with pytest.raises(ValueError, match=r"student_logits has 3 dimensions: pass dim="):
        softce.distillation_loss(student, teacher)
    with pytest.raises(ValueError, match=r"pass dim="):
        softce.distillation_loss(student.numpy(), teacher.numpy())
    a = softce.distillation_loss(student, teacher, dim=-1, reduction="none")
    b = softce.distillation_loss(student.transpose(1, 2), teacher.transpose(1, 2), dim=1,
                                 reduction="none")
    c = softce.distillation_loss(student.reshape(6, 6), teacher.reshape(6, 6),
                                 reduction="none").view(2, 3)
    assert a.shape == (2, 3)
    assert_close(a, b)
    assert_close(a, c)
    # NumPy: the gradient comes back in the caller's layout
    loss, grad = softce.distillation_loss(student.numpy(), teacher.numpy(), dim=2,
                                          return_grad=True)
    x = student.clone().requires_grad_()
    expected = softce.distillation_loss(x.reshape(6, 6), teacher.reshape(6, 6))
    expected.backward()
    assert grad.shape == (2, 3, 6)
    assert_close(torch.from_numpy(grad), x.grad)
    assert_close(torch.tensor(float(loss), dtype=torch.float64), expected)
    # the module
    module = softce.nn.DistillationLoss(dim=-1)
    assert_close(module(student, teacher), softce.distillation_loss(student, teacher, dim=-1))
    assert "dim=-1" in repr(module)
    with pytest.raises(IndexError, match=r"dim: expected a dimension in \[-3, 2\], got 3"):
        softce.distillation_loss(student, teacher, dim=3)


# ---------------------------------------------------------------------------------------
# in place


def test_inplace_accepted_on_non_overlapping_slices_of_a_temporary():
    w = randn(6, 4).requires_grad_()
    h = w * 2  # a non-leaf temporary
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = softce.cross_entropy(h[:, :3], target % 3, inplace_backward=True)
    loss.backward()
    w2 = w.detach().clone().requires_grad_()
    F.cross_entropy((w2 * 2)[:, :3], target % 3).backward()
    assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("make", [
    lambda w: w[:2],
    lambda w: w.view(-1)[:10].view(2, 5),
    lambda w: w.t()[:, :2].t(),
])
def test_inplace_refused_on_views_of_leaves_that_require_grad(make):
    w = randn(4, C).requires_grad_()
    before = w.detach().clone()
    with pytest.raises(ValueError, match="view of a leaf tensor that requires grad"):
        softce.cross_entropy(make(w), torch.tensor([0, 1]), inplace_backward=True)
    assert torch.equal(w.detach(), before)


def test_inplace_refused_when_an_argument_overlaps_the_input():
    big = randn(5, C).requires_grad_() * 1
    with pytest.raises(ValueError, match="target overlaps the memory of the input"):
        softce.cross_entropy(big[:-1], big[1:], inplace_backward=True)
    with pytest.raises(ValueError, match="target overlaps the memory of the input"):
        softce.kl_div(big, big, inplace_backward=True)
    with pytest.raises(ValueError, match="teacher overlaps the memory of the input"):
        softce.distillation_loss(big, big, inplace_backward=True)
    # not in place: overlapping inputs are only read, and the result is right
    x = big.detach()
    loss = softce.cross_entropy(x[:-1], torch.softmax(x[1:], 1))
    assert_close(loss, F.cross_entropy(x[:-1], torch.softmax(x[1:], 1)))


def test_inplace_refused_when_the_logits_are_needed_by_another_backward():
    z = randn(N, C).requires_grad_()
    logits = torch.exp(z)  # exp saves its output for backward
    loss = softce.cross_entropy(logits, probs(N, C), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_numpy_overlapping_as_strided_is_refused_in_place_and_right_otherwise():
    import numpy as np

    base = np.random.default_rng(0).standard_normal(20)
    x = np.lib.stride_tricks.as_strided(base, (4, 5), (16, 8))  # rows overlap, writable
    assert x.flags.writeable
    y = np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="elements do not overlap"):
        softce.cross_entropy(x, y, inplace_backward=True, return_grad=True)
    target = np.ascontiguousarray(base[:20].reshape(4, 5))
    with pytest.raises(ValueError, match="target overlaps the memory of the input"):
        softce.kl_div(target, target, inplace_backward=True, return_grad=True)
    loss, grad = softce.cross_entropy(x, y, return_grad=True)
    xt = torch.tensor(x.copy(), requires_grad=True)
    expected = F.cross_entropy(xt, torch.from_numpy(y))
    expected.backward()
    assert_close(torch.tensor(float(loss), dtype=torch.float64), expected)
    assert_close(torch.from_numpy(grad), xt.grad)


def test_distillation_dim_under_torch_compile():
    """dim=-1 on (batch, sequence, vocabulary) logits in a full graph, with a trainable
    teacher: the class dimension is moved as a view inside the graph."""
    module = softce.nn.DistillationLoss(temperature=2.0, divergence="jsd", beta=0.3, dim=-1)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(s, t, mask):
        return module(s, t, mask) * 3

    s, t = leaves((randn(2, 5, 11), randn(2, 5, 11)))
    mask = torch.tensor([[True, False, True, True, True], [False, True, True, True, False]])
    got = torch.autograd.grad(f(s, t, mask), (s, t))
    s2, t2 = leaves((s, t))
    expected = torch.autograd.grad(module(s2, t2, mask) * 3, (s2, t2))
    for a, b in zip(got, expected):
        assert_close(a, b)


# ---------------------------------------------------------------------------------------
# the custom operators' target gradient (compute_target_grad: the kernel's grad_target)


def refuse_reference_expressions(monkeypatch):
    from softce import _reference

    def refuse(*_args, **_kwargs):
        raise AssertionError("the reference expression was used")

    for function in ("cross_entropy", "cross_entropy_with_probs", "kl_div",
                     "binary_cross_entropy_with_logits", "distillation_loss"):
        monkeypatch.setattr(_reference, function, refuse)


@pytest.mark.parametrize("name", FUSED_TARGET_CASES)
def test_first_order_target_gradient_comes_from_the_kernel_in_the_custom_ops(name, monkeypatch):
    """The softce::* operators (the torch.compile path, called eagerly): first order, the
    target's gradient is the kernel's grad_target too, equal to the reference's."""
    from softce import _torch

    fn, args = CASES[name]
    a = leaves(args)
    expected = torch.autograd.grad(fn(*a).sum(), a, create_graph=True)
    monkeypatch.setattr(_torch, "_is_compiling", lambda: True)
    loss = fn(*a)
    assert "softce" in loss.grad_fn.name()
    refuse_reference_expressions(monkeypatch)
    got = torch.autograd.grad(loss.sum(), a)
    for x, y in zip(got, expected):
        assert_close(x, y.detach(), rtol=1e-12, atol=1e-14)
    assert got[1].abs().sum() > 0
    t = args[1].detach().clone().requires_grad_()
    (only,) = torch.autograd.grad(fn(args[0], t).sum(), t)
    assert_close(only, expected[1].detach(), rtol=1e-12, atol=1e-14)


def test_target_gradient_under_torch_compile_comes_from_the_kernel(monkeypatch):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, t, z):
        return softce.cross_entropy(x, t) + softce.distillation_loss(x, z, divergence="jsd")

    x, t, z = leaves((X[:, :, 0], P[:, :, 0], TEACHER[:, :, 0]))
    expected = torch.autograd.grad(
        softce.cross_entropy(x, t) + softce.distillation_loss(x, z, divergence="jsd"),
        (x, t, z))
    refuse_reference_expressions(monkeypatch)
    got = torch.autograd.grad(f(x, t, z), (x, t, z))
    for a, b in zip(got, expected):
        assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_custom_ops_with_compute_target_grad_pass_opcheck():
    x = randn(4, C).requires_grad_()
    p = probs(4, C).requires_grad_()
    z = randn(4, C).requires_grad_()
    for op, args in [
        (torch.ops.softce.cross_entropy.default,
         (x, p, None, False, WEIGHT, -100, "mean", 0.1, None, True, True)),
        (torch.ops.softce.cross_entropy.default,  # only the target requires grad
         (x.detach(), p, None, False, None, -100, "none", 0.0, None, False, True)),
        (torch.ops.softce.kl_div.default, (x, p, "batchmean", False, True, True)),
        (torch.ops.softce.binary_cross_entropy_with_logits.default,
         (x, p, None, None, "none", True, True)),
        (torch.ops.softce.distillation_loss.default,
         (x, z, None, False, 2.0, "jsd", 0.4, "batchmean", None, True, True)),
        (torch.ops.softce.cross_entropy_with_probs.default, (x, p, WEIGHT, "sum", True, True)),
    ]:
        torch.library.opcheck(op, args)


def test_compute_target_grad_needs_a_dense_float_target():
    x = randn(4, C)
    with pytest.raises(ValueError, match="compute_target_grad=True needs a dense"):
        torch.ops.softce.cross_entropy(x, torch.tensor([0, 1, 2, 3]), None, False, None, -100,
                                       "mean", 0.0, None, True, True)
